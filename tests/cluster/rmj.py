"""Helpers for the RewardModelJob tests against the local control plane."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/rmjob.dev/v1alpha1"


def _invalid_specs_module():
    """tests/operator/test_invalid_specs.py: the specs the API server must judge like parse_spec."""
    operator_tests = REPO / "tests" / "operator"
    if str(operator_tests) not in sys.path:
        sys.path.insert(0, str(operator_tests))  # for its `kube_schema` import
    spec = importlib.util.spec_from_file_location("rmjob_invalid_specs", operator_tests / "test_invalid_specs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


invalid_specs = _invalid_specs_module()


def cpu_spec(**sections) -> dict:
    """A spec whose Job-backend pods run on KWOK nodes (no GPU), with ``sections`` merged in."""
    spec = invalid_specs.with_changes(invalid_specs.MINIMAL, resources={"gpusPerNode": 0},
                                      runPolicy={"backend": "job"})
    return _merged(spec, sections)


def tiny_training_data(directory: Path) -> Path:
    """A tiny model (tiny-base) and the bundled dataset (sentiment_tiny) in ``directory``: the
    node's data that tiny_training_spec mounts."""
    from rmjob_trainer.tiny import BUNDLED_DATASET_DIR, build_tiny_model  # torch: only where a test trains

    build_tiny_model(directory / "tiny-base")
    shutil.copytree(BUNDLED_DATASET_DIR, directory / "sentiment_tiny")
    return directory


def tiny_training_spec(data_dir: Path, **sections) -> dict:
    """One CPU pod (Job backend) training the tiny model on the bundled dataset, both from
    ``data_dir`` (tiny_training_data's, a hostPath mounted at /data), with ``sections`` merged in."""
    spec = {
        "trainer": {
            "datasetMixer": {"/data/sentiment_tiny": 1.0}, "modelNameOrPath": "/data/tiny-base",
            "chatTemplate": "simple_chat", "sanityCheck": True, "sanityCheckMaxSamples": 400,
            "learningRate": 1.0e-3, "perDeviceTrainBatchSize": 8, "perDeviceEvalBatchSize": 32,
            "numEvals": 2,
        },
        "resources": {
            "nodes": 1, "gpusPerNode": 0,
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "OMP_NUM_THREADS", "value": "1"}],
            "volumes": [{"name": "local-data", "hostPath": {"path": str(data_dir), "type": "Directory"}}],
            "volumeMounts": [{"name": "local-data", "mountPath": "/data", "readOnly": True}],
        },
        "runPolicy": {"backend": "job"},
    }
    return _merged(spec, sections)


def _merged(spec: dict, sections: dict[str, dict]) -> dict:
    for section, changes in sections.items():
        spec.setdefault(section, {}).update(copy.deepcopy(changes))
    return spec


def rmj(name: str, namespace: str, spec: dict) -> dict:
    return {"apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def get_json(kubectl, *args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def get_or_none(kubectl, *args: str) -> dict | None:
    result = kubectl("get", *args, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return json.loads(result.stdout)


def wait_until(condition, timeout: float, message: str, interval: float = 0.5):
    """Polls ``condition()`` until it returns something truthy (returned), else fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def wait_established(kubectl, crd: str, timeout: float = 60) -> None:
    """Until the CRD is Established. Polled, because `kubectl wait --for=condition=Established`
    errors out instead of waiting while a just-created CRD has no status.conditions yet."""
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
    wait_until(lambda: kubectl("get", f"crd/{crd}", "-o", f"jsonpath={jsonpath}", check=False).stdout.strip() == "True",
               timeout, f"crd/{crd} Established")


def status_of(kubectl, namespace: str, name: str) -> dict:
    return (get_or_none(kubectl, "rmj", name, "-n", namespace) or {}).get("status") or {}


def wait_for_phase(kubectl, namespace: str, name: str, phase: str, timeout: float = 90, operator=None) -> dict:
    def reached():
        status = status_of(kubectl, namespace, name)
        return status if status.get("phase") == phase else None

    try:
        return wait_until(reached, timeout, f"{namespace}/{name} phase {phase}")
    except AssertionError as error:
        logs = operator.log()[-4000:] if operator else ""
        raise AssertionError(f"{error}; status: {status_of(kubectl, namespace, name)}\noperator log tail:\n{logs}") \
            from None


def condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def owned_by(obj: dict, owner: dict) -> bool:
    return any(ref.get("uid") == owner["metadata"]["uid"] for ref in obj["metadata"].get("ownerReferences") or [])


def token_request(cluster, token: str, method: str, path: str, body: dict | None = None,
                  content_type: str = "application/merge-patch+json") -> tuple[int, dict]:
    """One request as the bearer of ``token``: (HTTP status, decoded body)."""
    context = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
    request = urllib.request.Request(
        cluster.server + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
