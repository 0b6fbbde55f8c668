"""End to end against a real cluster: CRD + operator + an example job -> its workload.

Skipped unless KUBECONFIG is set. Needs no GPU: the job is submitted suspended, so the
workload is created but schedules no pods. Uses kubectl from .tools/bin (make install).

    KUBECONFIG=~/.kube/kind make e2e

By default the operator runs here as a subprocess watching a fresh namespace; with
RMJOB_E2E_IN_CLUSTER=1 the test relies on an operator already installed in the cluster
(`helm install` or `kubectl apply -k manifests/`) instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs a real cluster: set KUBECONFIG"),
]

REPO = Path(__file__).resolve().parents[2]
KUBECTL = REPO / ".tools" / "bin" / "kubectl"
EXAMPLE = REPO / "manifests" / "examples" / "level0-debug.yaml"


def kubectl(*args: str, input: str | None = None) -> str:
    result = subprocess.run([str(KUBECTL), *args], input=input, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout


def wait_for(what: str, predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def namespace():
    name = f"rmjob-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def operator(namespace):
    kubectl("apply", "--server-side", "-f", str(REPO / "manifests" / "crd.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/rewardmodeljobs.rmjob.dev", "--timeout=60s")
    if os.environ.get("RMJOB_E2E_IN_CLUSTER"):
        yield None
        return
    process = subprocess.Popen([sys.executable, "-m", "rmjob_operator", "--namespace", namespace,
                                "--log-format", "plain"])
    yield process
    process.terminate()
    process.wait(timeout=30)


def test_example_job_creates_its_workload(namespace, operator):
    job = yaml.safe_load(EXAMPLE.read_text())
    job["metadata"]["namespace"] = namespace
    job["spec"].setdefault("runPolicy", {})["suspend"] = True  # no GPU needed: no pods start
    kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=token=unused")
    kubectl("apply", "-f", "-", input=json.dumps(job))
    name = job["metadata"]["name"]

    def status() -> dict:
        return json.loads(kubectl("get", "rewardmodeljob", name, "-n", namespace, "-o", "json")).get("status") or {}

    workload = wait_for("status.workload", lambda: status().get("workload"))
    kind = {"PyTorchJob": "pytorchjobs.kubeflow.org", "Job": "jobs.batch"}[workload["kind"]]
    live = json.loads(kubectl("get", kind, workload["name"], "-n", namespace, "-o", "json"))
    assert live["metadata"]["labels"]["rmjob.dev/job-name"] == name
    assert live["metadata"]["ownerReferences"][0]["kind"] == "RewardModelJob"
    wait_for("phase Suspended", lambda: status().get("phase") == "Suspended")
    config = json.loads(kubectl("get", "configmap", f"{name}-config", "-n", namespace, "-o", "json"))
    assert yaml.safe_load(config["data"]["trainer.yaml"])["model_name_or_path"] == "EleutherAI/pythia-14m"
