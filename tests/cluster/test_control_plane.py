"""The local control plane is a real Kubernetes: version, CRD admission, RBAC, Job controller,
scheduler + KWOK nodes, garbage collector. Everything goes through the real kubectl."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, local_cluster
from rmj import wait_established

pytestmark = pytest.mark.cluster

CRD = REPO / "manifests" / "crd.yaml"


def get_json(kubectl, *args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def test_server_reports_the_pinned_version(kubectl):
    version = json.loads(kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == local_cluster.pinned_kubernetes_version()
    assert (version["major"], version["minor"]) == ("1", version["gitVersion"].split(".")[1])


def test_up_is_idempotent(cluster):
    before = cluster.state()
    cluster.up(owner=before["owner"])
    assert cluster.state()["pids"] == before["pids"]
    assert cluster.running()


def test_crd_is_accepted_and_rmj_is_listable(kubectl):
    applied = kubectl("apply", "-f", str(CRD), check=False)
    if "AlreadyExists" in applied.stderr:  # another worker's rmj_crd fixture created it meanwhile
        applied = kubectl("apply", "-f", str(CRD), check=False)
    assert applied.returncode == 0, f"the API server refused manifests/crd.yaml: {applied.stderr.strip()}"
    name = yaml.safe_load(CRD.read_text())["metadata"]["name"]
    wait_established(kubectl, name)
    listed = kubectl("get", "rmj", "--all-namespaces", check=False)
    assert listed.returncode == 0, listed.stderr
    assert "No resources found" in listed.stderr + listed.stdout


def test_rbac_limits_a_service_account_to_its_role(kubectl, cluster, namespace, tmp_path):
    kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kubectl("create", "role", "configmap-reader", "--verb=get,list", "--resource=configmaps", "-n", namespace)
    kubectl("create", "rolebinding", "reader", "--role=configmap-reader",
            f"--serviceaccount={namespace}:reader", "-n", namespace)
    # A real token from the TokenRequest API, signed with the cluster's service-account key.
    token = kubectl("create", "token", "reader", "-n", namespace, "--duration=10m").stdout.strip()
    reader = tmp_path / "reader.kubeconfig"
    cluster.token_kubeconfig(reader, user="reader", token=token)

    allowed = kubectl("get", "configmaps", "-n", namespace, kubeconfig=reader, check=False)
    assert allowed.returncode == 0, allowed.stderr
    for forbidden_args in (("get", "secrets", "-n", namespace), ("get", "configmaps", "-n", "default"),
                           ("create", "configmap", "x", "-n", namespace)):
        # -v=6 logs each response's status line: the refusal must be the API server's 403.
        refused = kubectl(*forbidden_args, "-v=6", kubeconfig=reader, check=False)
        assert refused.returncode != 0
        assert re.search(r"round_trippers.*403 Forbidden", refused.stderr), refused.stderr[-2000:]
        assert f'User "system:serviceaccount:{namespace}:reader" cannot' in refused.stderr, refused.stderr[-2000:]


def test_job_controller_creates_indexed_pods_that_run_on_kwok_nodes(kubectl, namespace):
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "indexed", "namespace": namespace},
        "spec": {
            "completionMode": "Indexed", "completions": 2, "parallelism": 2,
            "template": {"spec": {"restartPolicy": "Never",
                                  "containers": [{"name": "main", "image": "busybox:1.37", "command": ["true"]}]}},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(job))
    kubectl("wait", "--for=condition=Complete", "job/indexed", "-n", namespace, "--timeout=120s")

    pods = get_json(kubectl, "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=indexed")["items"]
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"]
    for pod in pods:
        assert pod["spec"]["nodeName"].startswith("kwok-node-"), pod["spec"].get("nodeName")
        assert pod["status"]["phase"] == "Succeeded"
        # Indexed Jobs give each pod a stable hostname NAME-INDEX, the rendezvous name scheme.
        assert pod["spec"]["hostname"] == f"indexed-{pod['metadata']['annotations']['batch.kubernetes.io/job-completion-index']}"
    assert get_json(kubectl, "job/indexed", "-n", namespace)["status"]["succeeded"] == 2


def test_garbage_collector_deletes_what_the_deleted_owner_owned(kubectl, namespace):
    kubectl("create", "configmap", "owner", "-n", namespace)
    owner_uid = get_json(kubectl, "configmap/owner", "-n", namespace)["metadata"]["uid"]
    owned = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "owned", "namespace": namespace,
                     "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}]},
    }
    kubectl("apply", "-f", "-", input=json.dumps(owned))
    kubectl("delete", "configmap", "owner", "-n", namespace)

    deadline = time.monotonic() + 60
    while kubectl("get", "configmap", "owned", "-n", namespace, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the garbage collector left the owned ConfigMap in place for 60s"
        time.sleep(0.5)


def test_a_runner_namespace_sends_its_pods_to_the_runner_node(kubectl, namespace):
    """The scheme the test pod runner relies on: a node with RUNNER_LABEL and RUNNER_TAINT, not
    managed by KWOK, receives the pods of namespaces annotated RUNNER_NAMESPACE_ANNOTATIONS."""
    node = f"runner-{namespace}"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    key, value = local_cluster.RUNNER_LABEL
    kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node, "labels": {key: value, "kubernetes.io/hostname": node}},
        "spec": {"taints": [local_cluster.RUNNER_TAINT]},
        "status": {"capacity": {"cpu": "2", "memory": "4Gi", "pods": "10"},
                   "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "10"},
                   # Ready, as a runner reports it: the node-lifecycle controller then lifts the
                   # not-ready taint that admission puts on every new node.
                   "conditions": [{"type": "Ready", "status": "True", "reason": "RunnerReady",
                                   "lastHeartbeatTime": now, "lastTransitionTime": now}]},
    }))
    try:
        kubectl("annotate", "namespace", namespace,
                *(f"{k}={v}" for k, v in local_cluster.RUNNER_NAMESPACE_ANNOTATIONS.items()))
        kubectl("run", "probe", "-n", namespace, "--image=busybox:1.37", "--restart=Never", "--", "true")
        kubectl("wait", "--for=jsonpath={.spec.nodeName}=" + node, "pod/probe", "-n", namespace, "--timeout=60s")
        pod = get_json(kubectl, "pod/probe", "-n", namespace)
        assert pod["spec"]["nodeSelector"] == {key: value}
        # Nobody (KWOK included) runs pods on this node, so it stays where the runner would pick it up.
        assert pod["status"]["phase"] == "Pending"
    finally:
        kubectl("delete", "pod", "probe", "-n", namespace, "--force", "--grace-period=0", check=False)
        kubectl("delete", "node", node, check=False)


@pytest.mark.slow
def test_up_restarts_only_the_dead_component_and_a_sigkilled_session_leaves_nothing(cluster, tmp_path):
    """A cluster of its own (not the shared one): started by a test session that is then
    SIGKILLed; its scheduler dies too. The next session's attach restarts the scheduler alone
    (same ports, CA and etcd data); its detach stops the cluster, the killed user not counting."""
    state_dir = tmp_path / "cluster"
    session = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]); import cluster, time; "
        "cluster.Cluster(sys.argv[2], sys.argv[3]).attach(nodes=1); print('attached', flush=True); time.sleep(600)"),
        str(REPO / "hack" / "cluster"), str(state_dir), str(cluster.bin)], stdout=subprocess.PIPE, text=True)
    own = local_cluster.Cluster(state_dir, cluster.bin)
    try:
        assert session.stdout.readline().strip() == "attached"
        session.send_signal(signal.SIGKILL)
        session.wait()
        before = own.state()
        ca = (own.pki / "ca.crt").read_bytes()
        own.api("POST", "/api/v1/namespaces", {"metadata": {"name": "keep-me"}})
        scheduler = before["pids"]["kube-scheduler"]["pid"]
        os.kill(scheduler, signal.SIGKILL)
        while local_cluster._process_start(scheduler):
            time.sleep(0.1)

        assert own.attach() is True
        after = own.state()
        assert after["ports"] == before["ports"]
        assert {k: v for k, v in after["pids"].items() if k != "kube-scheduler"} == \
            {k: v for k, v in before["pids"].items() if k != "kube-scheduler"}
        assert after["pids"]["kube-scheduler"]["pid"] != scheduler
        assert (own.pki / "ca.crt").read_bytes() == ca
        assert own.api("GET", "/api/v1/namespaces/keep-me")["metadata"]["name"] == "keep-me"
        assert own.running()

        assert own.detach() is True
        assert own._components_by_command_line() == {}
        assert own.state() is None
    finally:
        session.kill()
        own.down()
