"""spec.storage against the real control plane (issue 9, item 1): the operator creates the job's
PersistentVolumeClaim, the trainer pod (a real trainer process, run by the pod runner) writes its
checkpoints there, and a pod stopped mid-run (once evicted, as a preemption does, once deleted)
is replaced without using up the default backoffLimit of 0 and resumes from the newest
checkpoint, ending with the metrics of an uninterrupted run.

The local cluster has no storage provisioner and no PersistentVolume controller: the test binds
the claim itself, to a hostPath PersistentVolume in its own directory, the way the controller
would (PV claimRef, the claim's volumeName and bind-completed annotation, both statuses Bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from rmj import (condition, get_json, get_or_none, rmj, tiny_training_data, tiny_training_spec, wait_for_phase,
                 wait_until)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TRAINING_TIMEOUT_S = 900
NAME = "rm-storage"


def job_spec(data_dir) -> dict:
    """One CPU pod, 300 optimizer steps (about 40 s of training here), a checkpoint every 20."""
    # backoffLimit stays 0: neither an eviction nor a preempted trainer counts against it.
    return tiny_training_spec(data_dir, trainer={"numTrainEpochs": 6, "checkpointingSteps": 20},
                              storage={"size": "1Gi"}, runPolicy={"terminationGracePeriodSeconds": 60})


def bind_claim(kubectl, namespace: str, claim_name: str, directory) -> str:
    """What the PersistentVolume controller does for a statically provisioned volume."""
    claim = wait_until(lambda: get_or_none(kubectl, "pvc", claim_name, "-n", namespace), 60, f"pvc {claim_name}")
    volume = f"pv-{namespace}"
    directory.mkdir(parents=True, exist_ok=True)
    kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
        "spec": {"capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
                 "accessModes": claim["spec"]["accessModes"], "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": str(directory), "type": "Directory"},
                 "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": namespace,
                              "name": claim_name, "uid": claim["metadata"]["uid"]}}}))
    kubectl("patch", "pv", volume, "--subresource=status", "--type=merge", "-p", '{"status": {"phase": "Bound"}}')
    # The scheduler places the pod as soon as the claim names its volume: status first.
    kubectl("patch", "pvc", claim_name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps({
        "status": {"phase": "Bound", "accessModes": claim["spec"]["accessModes"],
                   "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]}}}))
    kubectl("patch", "pvc", claim_name, "-n", namespace, "--type=merge", "-p", json.dumps({
        "metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}}, "spec": {"volumeName": volume}}))
    return volume


def release(kubectl, namespace: str, claim_name: str, volume: str | None = None) -> None:
    """Deletes the claim (and volume) now: the pvc-protection controller would release the claim
    only once the job's pods are gone, and this cluster runs no binder to mark the volume
    Released, so its pv-protection finalizer would keep it Terminating for good."""
    no_finalizers = json.dumps({"metadata": {"finalizers": None}})
    kubectl("delete", "pvc", claim_name, "-n", namespace, "--wait=false", check=False)
    kubectl("patch", "pvc", claim_name, "-n", namespace, "--type=merge", "-p", no_finalizers, check=False)
    if volume:
        kubectl("delete", "pv", volume, "--wait=false", check=False)
        kubectl("patch", "pv", volume, "--type=merge", "-p", no_finalizers, check=False)


def checkpoints(output) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (output / "checkpoints").glob("step_*"))


def running_pod(kubectl, namespace: str, exclude: set[str]) -> dict | None:
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={NAME}")["items"]
    return next((p for p in pods if p["metadata"]["name"] not in exclude and p["status"].get("phase") == "Running"
                 and not p["metadata"].get("deletionTimestamp")), None)


def interrupt_after_a_checkpoint(kubectl, namespace, output, pods_seen: set[str], how: str) -> tuple[int, int]:
    """Waits for a new running pod to write a checkpoint of its own, stops it (``evict`` or
    ``delete``) and waits until it is gone: (that checkpoint's step, the newest step then)."""
    pod = wait_until(lambda: running_pod(kubectl, namespace, pods_seen), 300, "a running trainer pod")
    name = pod["metadata"]["name"]
    pods_seen.add(name)
    before = max(checkpoints(output), default=0)
    step = wait_until(lambda: next((s for s in checkpoints(output) if s > before), None), 300,
                      f"a checkpoint after step {before}", interval=0.2)
    if how == "evict":
        kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", "-f", "-",
                input=json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                                  "metadata": {"name": name, "namespace": namespace}}))
    else:
        kubectl("delete", "pod", name, "-n", namespace, "--wait=false")
    wait_until(lambda: get_or_none(kubectl, "pod", name, "-n", namespace) is None, 120, f"pod {name} gone")
    return step, max(checkpoints(output))


def uninterrupted_metrics(config_map: dict, data_dir, output) -> dict:
    """The same trainer.yaml, trained in one go by torchrun on this host."""
    config = yaml.safe_load(config_map["data"]["trainer.yaml"])
    text = yaml.safe_dump(config).replace("/data/", f"{data_dir}/")
    config = yaml.safe_load(text)
    config["output_dir"] = str(output)
    output.parent.mkdir(parents=True)
    path = output.parent / "uninterrupted.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("RMJOB_", "KUBERNETES_"))}
    result = subprocess.run([str(os.path.join(os.path.dirname(sys.executable), "torchrun")), "--nproc_per_node=1",
                             "--master_port=29500", "-m", "rmjob_trainer", "--config", str(path)],
                            capture_output=True, text=True, env=env, timeout=TRAINING_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.timeout(3 * TRAINING_TIMEOUT_S)
def test_created_claim_survives_two_interrupted_pods_and_the_run_resumes_from_checkpoints(
        host_rendezvous_port, kubectl, namespace, pod_runner, rmj_crd, start_operator, tmp_path):
    data_dir = tiny_training_data(tmp_path / "node")
    output = tmp_path / "volume"
    operator = start_operator([namespace])
    kubectl("apply", "-f", "-", input=json.dumps(rmj(NAME, namespace, job_spec(data_dir))))
    volume = bind_claim(kubectl, namespace, f"{NAME}-output", output)
    try:
        job = get_json(kubectl, "rewardmodeljobs.rmjob.dev", NAME, "-n", namespace)
        claim = get_json(kubectl, "pvc", f"{NAME}-output", "-n", namespace)
        assert [ref["uid"] for ref in claim["metadata"]["ownerReferences"]] == [job["metadata"]["uid"]]

        pods_seen: set[str] = set()
        evicted_at, newest_after_eviction = interrupt_after_a_checkpoint(kubectl, namespace, output, pods_seen,
                                                                         "evict")
        deleted_at, newest_after_deletion = interrupt_after_a_checkpoint(kubectl, namespace, output, pods_seen,
                                                                         "delete")
        status = wait_for_phase(kubectl, namespace, NAME, "Succeeded", TRAINING_TIMEOUT_S, operator)

        pods = get_json(kubectl, "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={NAME}")["items"]
        (finisher,) = [p["metadata"]["name"] for p in pods if p["metadata"]["name"] not in pods_seen]
        logs = {name: pod_runner.log(namespace, name, "pytorch") for name in [*pods_seen, finisher]}
        assert len(logs) == 3, (sorted(logs), pods_seen, pod_runner.errors)
        # Each replacement started from the newest checkpoint its predecessor left.
        resumed = {name: [int(line.rsplit("step_", 1)[1]) for line in log.splitlines()
                          if line.startswith("run ") and ", resuming from " in line] for name, log in logs.items()}
        assert evicted_at <= newest_after_eviction < deleted_at <= newest_after_deletion
        assert sorted(step for steps in resumed.values() for step in steps) == \
            [newest_after_eviction, newest_after_deletion], resumed
        assert resumed[finisher] == [newest_after_deletion]
        assert get_json(kubectl, "job", NAME, "-n", namespace)["status"]["succeeded"] == 1
        # Each stopped pod ended as preempted (rmjob-torchrun's 200), not as an error.
        for name in pods_seen:
            assert "exit status 200 (preempted, retryable)" in logs[name], logs[name][-2000:]
        assert status["progress"] == {"percentage": 100, "estimatedRemainingSeconds": 0}
        assert condition(status, "Succeeded")["status"] == "True"

        final = json.loads((output / "metrics.json").read_text())
        config_map = get_json(kubectl, "configmap", f"{NAME}-config", "-n", namespace)
        assert yaml.safe_load(config_map["data"]["trainer.yaml"])["output_dir"] == "/output"
        expected = uninterrupted_metrics(config_map, data_dir, tmp_path / "uninterrupted" / "output")
        assert {k: v for k, v in final.items() if k != "run_name"} == \
            {k: v for k, v in expected.items() if k != "run_name"}
        assert (output / "model.safetensors").exists() or list(output.glob("*.safetensors"))
    finally:
        kubectl("delete", "rewardmodeljobs.rmjob.dev", NAME, "-n", namespace, "--wait=false", check=False)
        release(kubectl, namespace, f"{NAME}-output", volume)


@pytest.mark.timeout(120)
def test_several_nodes_on_an_existing_read_write_once_claim_are_refused(kubectl, namespace, rmj_crd, start_operator):
    """The CRD cannot see an existing claim: the operator reads its access modes and refuses."""
    kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "team", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))
    try:
        operator = start_operator([namespace])
        spec = {"trainer": {"modelNameOrPath": "m", "datasetMixer": {"d": 1.0}},
                "resources": {"nodes": 2, "gpusPerNode": 0}, "storage": {"existingClaim": "team"},
                "runPolicy": {"backend": "job"}}
        kubectl("apply", "-f", "-", input=json.dumps(rmj("rm-rwo", namespace, spec)))
        status = wait_for_phase(kubectl, namespace, "rm-rwo", "Failed", 60, operator)
        assert condition(status, "InvalidSpec")["status"] == "True"
        assert status["message"] == ("spec.storage.existingClaim: PersistentVolumeClaim team is ReadWriteOnce; with "
                                     "nodes > 1 it must be ReadWriteMany (every node writes and reads checkpoints)")
        assert get_or_none(kubectl, "job", "rm-rwo", "-n", namespace) is None
    finally:
        release(kubectl, namespace, "team")


@pytest.mark.timeout(240)
def test_an_evicted_pod_keeps_its_disruption_condition_so_the_job_replaces_it(kubectl, namespace, pod_runner,
                                                                              tmp_path):
    """The pod runner's status writes must keep the DisruptionTarget condition an eviction sets
    (a kubelet's strategic merge does): without it the Job counts an evicted trainer as failed.
    The first pod exits 1 on SIGTERM, the replacement finds the marker and exits 0."""
    marker = tmp_path / "first-pod-ran"
    script = f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; trap 'exit 1' TERM; while true; do sleep 0.2; done"
    kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "evicted", "namespace": namespace},
        "spec": {"backoffLimit": 0, "podFailurePolicy": {"rules": [
                     {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
                 "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 10,
                                       "containers": [{"name": "c", "image": "none", "command": ["sh", "-c", script]}]}}}}))
    pod = wait_until(lambda: next((p for p in get_json(kubectl, "pods", "-n", namespace, "-l", "job-name=evicted")["items"]
                                   if p["status"].get("phase") == "Running"), None), 120, "the first pod running")
    wait_until(marker.exists, 30, "the first pod's marker")
    name = pod["metadata"]["name"]
    kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", "-f", "-",
            input=json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                              "metadata": {"name": name, "namespace": namespace}}))

    def finished():
        conditions = get_json(kubectl, "job", "evicted", "-n", namespace)["status"].get("conditions") or []
        return next((c["type"] for c in conditions if c["type"] in ("Complete", "Failed") and c["status"] == "True"),
                    None)

    assert wait_until(finished, 180, "the Job to finish") == "Complete", pod_runner.errors

