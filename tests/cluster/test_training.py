"""Real training through the control plane (issue 8, test 8): the CPU example
(manifests/examples/cpu-local.yaml) reconciled by the operator process, its Indexed Job's two
pods run by the pod runner, torchrun across both, rank 0 reporting with the job's token."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import yaml

from conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXAMPLE = REPO / "manifests" / "examples" / "cpu-local.yaml"
TRAINING_TIMEOUT_S = 900  # two CPU processes on a shared two-core machine; about a minute when idle


def node_data(directory):
    """What the example expects on its node's hostPath: the tiny base model and the bundled data."""
    from rmjob_trainer.tiny import BUNDLED_DATASET_DIR, build_tiny_model

    build_tiny_model(directory / "tiny-base")
    shutil.copytree(BUNDLED_DATASET_DIR, directory / "sentiment_tiny")
    return directory


def get_json(kubectl, *args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


@pytest.mark.timeout(TRAINING_TIMEOUT_S + 120)
def test_cpu_example_trains_across_two_pods_and_reports_its_status(
        host_rendezvous_port, kubectl, namespace, pod_runner, rmj_crd, start_operator, tmp_path):
    job = yaml.safe_load(EXAMPLE.read_text())
    (volume,) = job["spec"]["resources"]["volumes"]
    volume["hostPath"]["path"] = str(node_data(tmp_path / "node"))
    job["metadata"]["namespace"] = namespace
    name = job["metadata"]["name"]
    operator = start_operator([namespace])
    kubectl("apply", "-f", "-", input=json.dumps(job))

    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while (status := get_json(kubectl, "rmj", name, "-n", namespace).get("status") or {}).get("phase") not in (
            "Succeeded", "Failed") and time.monotonic() < deadline:
        time.sleep(2)
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={name}")["items"]
    logs = "\n".join(f"--- {p['metadata']['name']}:\n{pod_runner.log(namespace, p['metadata']['name'], 'pytorch')[-3000:]}"
                     for p in pods)
    assert status.get("phase") == "Succeeded", (
        f"status: {status}\n{logs}\n--- operator:\n{operator.log()[-3000:]}\nrunner errors: {pod_runner.errors}")

    # Both indexes ran here, as processes, to a clean exit.
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    for pod in pods:
        assert pod["spec"]["nodeName"] == pod_runner.node
        assert pod["spec"]["serviceAccountName"] == f"{name}-trainer"  # the per-job account, whose token it got
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # torchrun across both pods: one world of two processes, each pod one rank.
    assert status["topology"]["worldSize"] == 2
    training = status["training"]
    assert training["done"] is True and training["step"] == training["totalSteps"] > 0
    assert 0.0 <= training["evalAccuracy"] <= 1.0
    assert status["metrics"]["evalAccuracy"] == training["evalAccuracy"]
    # status.training came from rank 0's kubernetes client (field manager rmjob-trainer), on the
    # status subresource, authenticated by the job's token: the operator (kopf) does not write it.
    rmj = get_json(kubectl, "rmj", name, "-n", namespace, "--show-managed-fields")
    writers = [entry for entry in rmj["metadata"]["managedFields"]
               if entry.get("subresource") == "status" and "f:training" in entry.get("fieldsV1", {}).get("f:status", {})]
    assert [entry["manager"].split("/")[0] for entry in writers] == ["rmjob-trainer"], rmj["metadata"]["managedFields"]
