"""Every example in manifests/examples/, applied with the real kubectl, gets its children from
the operator process and the API server accepts all of them (the PyTorchJob CRD installed, as
the `auto` backend then picks it); with the Job backend, their pods run to completion on KWOK
nodes (one with GPUs) and each job reaches Succeeded."""

from __future__ import annotations

import json

import pytest
import yaml
from operator_harness import new_namespace
from rmj import REPO, get_json, get_or_none, owned_by, status_of, wait_established, wait_for_phase, wait_until

pytestmark = pytest.mark.cluster

EXAMPLES = REPO / "manifests" / "examples"
PYTORCHJOB_CRD = REPO.parent / "shared" / "reference" / "crds" / "kubeflow.org_pytorchjobs.v1.9.0.yaml"
GPU_NODE = "kwok-gpu-node-0"


def example_docs() -> list[dict]:
    return [doc for path in sorted(EXAMPLES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def example_jobs() -> list[dict]:
    return [doc for doc in example_docs() if doc["kind"] == "RewardModelJob"]


@pytest.fixture(scope="module")
def gpu_node(cluster, kubectl):
    """A KWOK node with GPUs, shared (created once; other tests' pods may land there too)."""
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": GPU_NODE, "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"kubernetes.io/hostname": GPU_NODE, "type": "kwok"}},
            "status": {"capacity": {"cpu": "1k", "memory": "4Ti", "pods": "1k", "nvidia.com/gpu": "128"},
                       "allocatable": {"cpu": "1k", "memory": "4Ti", "pods": "1k", "nvidia.com/gpu": "128"}}}
    created = kubectl("create", "-f", "-", input=json.dumps(node), check=False)
    assert created.returncode == 0 or "AlreadyExists" in created.stderr, created.stderr
    kubectl("wait", "--for=condition=Ready", f"node/{GPU_NODE}", "--timeout=60s")
    wait_until(lambda: not get_json(kubectl, "node", GPU_NODE)["spec"].get("taints"), 60, "the GPU node untainted")
    return GPU_NODE


@pytest.fixture(scope="module")
def pytorchjob_crd(kubectl):
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=rmjob-tests", "-f", str(PYTORCHJOB_CRD))
    wait_established(kubectl, "pytorchjobs.kubeflow.org")


@pytest.fixture(scope="module")
def namespaces(kubectl):
    names = {"as-shipped": new_namespace(kubectl), "job-backend": new_namespace(kubectl)}
    yield names
    for name in names.values():
        kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(pytorchjob_crd, namespaces, start_operator):
    process = start_operator(sorted(namespaces.values()))
    yield process
    assert process.stop() == 0


def test_every_example_applied_with_kubectl_gets_children_the_api_server_accepts(kubectl, namespaces, operator):
    ns = namespaces["as-shipped"]
    applied = kubectl("apply", "-n", ns, "-f", str(EXAMPLES)).stdout
    jobs = example_jobs()
    assert len(jobs) >= 7
    for doc in jobs:
        assert f"rewardmodeljob.rmjob.dev/{doc['metadata']['name']} created" in applied, applied
    for doc in jobs:
        name = doc["metadata"]["name"]
        status = wait_until(lambda name=name: status_of(kubectl, ns, name).get("workload") and
                            status_of(kubectl, ns, name), 90, f"{name}'s workload")
        backend = doc["spec"].get("runPolicy", {}).get("backend", "auto")
        expected = ("batch/v1", "Job") if backend == "job" else ("kubeflow.org/v1", "PyTorchJob")
        assert (status["workload"]["apiVersion"], status["workload"]["kind"]) == expected, (name, status)
        assert status["phase"] != "Failed", (name, status)
        owner = get_json(kubectl, "rmj", name, "-n", ns)
        workload_kind = "pytorchjobs.kubeflow.org" if expected[1] == "PyTorchJob" else "jobs.batch"
        kinds = ["configmap", "serviceaccount", "role", "rolebinding", workload_kind]
        names = [f"{name}-config", f"{name}-trainer", f"{name}-trainer", f"{name}-trainer", name]
        for kind, child_name in zip(kinds, names):
            child = get_or_none(kubectl, kind, child_name, "-n", ns)
            assert child is not None and owned_by(child, owner), (name, kind)


def bind_claims(kubectl, ns: str) -> None:
    """Binds the examples' PersistentVolumeClaims to PersistentVolumes made for them, as a
    provisioner would (this control plane runs no volume controller)."""
    for claim in (d for d in example_docs() if d["kind"] == "PersistentVolumeClaim"):
        name = claim["metadata"]["name"]
        volume = f"{ns}-{name}"
        kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
            "spec": {"capacity": claim["spec"]["resources"]["requests"], "accessModes": claim["spec"]["accessModes"],
                     "hostPath": {"path": f"/tmp/{volume}"}, "persistentVolumeReclaimPolicy": "Delete",
                     "claimRef": {"namespace": ns, "name": name}}}))
        kubectl("patch", "pvc", name, "-n", ns, "--type=merge", "-p", json.dumps(
            {"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
             "spec": {"volumeName": volume}}))
        kubectl("patch", "pvc", name, "-n", ns, "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"phase": "Bound", "accessModes": claim["spec"]["accessModes"],
                        "capacity": claim["spec"]["resources"]["requests"]}}))
        kubectl("patch", "pv", volume, "--subresource=status", "--type=merge", "-p",
                json.dumps({"status": {"phase": "Bound"}}))


def test_every_example_with_the_job_backend_succeeds_on_kwok_nodes(kubectl, namespaces, operator, gpu_node):
    ns = namespaces["job-backend"]
    docs = example_docs()
    for doc in docs:
        if doc["kind"] == "RewardModelJob":
            doc.setdefault("spec", {}).setdefault("runPolicy", {})["backend"] = "job"
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    jobs = [d for d in docs if d["kind"] == "RewardModelJob"]
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": claims}))
    bind_claims(kubectl, ns)
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": jobs}))
    for doc in jobs:
        name = doc["metadata"]["name"]
        status = wait_for_phase(kubectl, ns, name, "Succeeded", timeout=120, operator=operator)
        assert status["workload"] == {"apiVersion": "batch/v1", "kind": "Job", "name": name}
        resources = doc["spec"].get("resources", {})
        pods = get_json(kubectl, "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={name}")["items"]
        assert len(pods) == resources.get("nodes", 1), name
        for pod in pods:
            assert pod["status"]["phase"] == "Succeeded" and pod["spec"]["nodeName"].startswith("kwok-"), name
            gpus = pod["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
            assert int(gpus or 0) == resources.get("gpusPerNode", 1), name
