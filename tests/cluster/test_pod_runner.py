"""hack/cluster/pod_runner.py: pods bound to the runner's node run as local processes, with
their env, volumes, mapped container paths and a real service-account token, and the API
server sees their status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# At import time `conftest` is this folder's; inside a test it may be another folder's.
from conftest import REPO, local_cluster, pod_runner_module

# What each pod prints: downward API fields, $(VAR) expansion, the rendezvous name, a mounted
# ConfigMap (naming another mount's path), and who the API server says its token belongs to.
SCRIPT = textwrap.dedent("""\
    import json, os, ssl, urllib.request
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = open(sa + "/token").read()
    context = ssl.create_default_context(cafile=sa + "/ca.crt")
    request = urllib.request.Request(
        "https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews"
        % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]),
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"}, method="POST")
    user = json.load(urllib.request.urlopen(request, context=context))["status"]["userInfo"]
    out = open("/etc/demo/settings").read().split("=", 1)[1].strip()
    os.makedirs(out, exist_ok=True)
    with open(out + "/index", "w") as f:
        f.write(os.environ["INDEX"])
    print(json.dumps({"env": {k: os.environ[k] for k in ("POD", "INDEX", "NS", "GREETING", "PEER")},
                      "namespace_file": open(sa + "/namespace").read(), "user": user,
                      "out": out, "written": open(out + "/index").read()}))
    """)


def indexed_job(namespace: str) -> list[dict]:
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": namespace},
              "data": {"settings": "output=/work/out\n", "script.py": SCRIPT}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace},
               "spec": {"clusterIP": "None", "selector": {"app": "echo"}, "ports": [{"port": 29500}]}}
    field = lambda path: {"valueFrom": {"fieldRef": {"fieldPath": path}}}  # noqa: E731
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "echo", "namespace": namespace},
        "spec": {
            "completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": "echo"}},
                "spec": {
                    "restartPolicy": "Never", "subdomain": "echo",
                    "containers": [{
                        "name": "main", "image": "python:3.11", "command": ["python"],
                        "args": ["/etc/demo/script.py"],
                        "env": [
                            {"name": "POD", **field("metadata.name")},
                            {"name": "INDEX", **field("metadata.annotations['batch.kubernetes.io/job-completion-index']")},
                            {"name": "NS", **field("metadata.namespace")},
                            {"name": "GREETING", "value": "hello $(POD)"},
                            {"name": "PEER", "value": "echo-0.echo:29500"},
                        ],
                        "volumeMounts": [{"name": "settings", "mountPath": "/etc/demo"},
                                         {"name": "work", "mountPath": "/work"}],
                    }],
                    "volumes": [{"name": "settings", "configMap": {"name": "settings"}},
                                {"name": "work", "emptyDir": {}}],
                },
            },
        },
    }
    return [config, service, job]


def get_json(kubectl, *args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def wait_for_job(kubectl, namespace: str, name: str, timeout: float) -> str:
    """The Job's terminal condition (Complete or Failed), or "still running" after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conditions = get_json(kubectl, f"job/{name}", "-n", namespace).get("status", {}).get("conditions", [])
        done = [c["type"] for c in conditions if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
        if done:
            return done[0]
        time.sleep(1)
    return f"still running after {timeout:.0f}s"


def pod_log(runner, namespace: str, pod: str) -> str:
    return runner.log(namespace, pod, "main")


@pytest.mark.cluster
@pytest.mark.slow
def test_indexed_job_pods_run_with_their_env_volumes_and_token(kubectl, namespace, pod_runner):
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                  "items": indexed_job(namespace)}))
    finished = wait_for_job(kubectl, namespace, "echo", timeout=180)
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=echo")["items"]
    logs = {p["metadata"]["name"]: pod_log(pod_runner, namespace, p["metadata"]["name"]) for p in pods}
    assert finished == "Complete", f"job {finished}\nlogs: {logs}\nrunner errors: {pod_runner.errors}"

    assert len(pods) == 2
    for pod in pods:
        name, index = pod["metadata"]["name"], pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        assert pod["spec"]["nodeName"] == pod_runner.node
        status = pod["status"]
        assert (status["phase"], status["podIP"], status["hostIP"]) == ("Succeeded", "127.0.0.1", "127.0.0.1")
        (container,) = status["containerStatuses"]
        assert container["state"]["terminated"]["exitCode"] == 0
        assert container["state"]["terminated"]["reason"] == "Completed"

        printed = json.loads(logs[name].strip().splitlines()[-1])
        assert printed["env"] == {"POD": name, "INDEX": index, "NS": namespace, "GREETING": f"hello {name}",
                                  "PEER": "127.0.0.1:29500"}
        assert printed["namespace_file"] == namespace
        # The mounted ConfigMap's /work/out became this pod's own emptyDir, which it wrote.
        assert printed["out"].startswith(str(pod_runner.workdir / namespace / name))
        assert printed["written"] == index
        # A real token for the pod's ServiceAccount, bound to this very pod.
        assert printed["user"]["username"] == f"system:serviceaccount:{namespace}:default"
        assert printed["user"]["extra"]["authentication.kubernetes.io/pod-name"] == [name]
        assert printed["user"]["extra"]["authentication.kubernetes.io/pod-uid"] == [pod["metadata"]["uid"]]
    assert get_json(kubectl, "job/echo", "-n", namespace)["status"]["succeeded"] == 2
    assert pod_runner.errors == []


def bare_pod(namespace: str, name: str, command: list[str], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "busybox:1.37", "command": command}], **spec}}


@pytest.mark.cluster
@pytest.mark.slow
def test_exit_codes_and_unsupported_volumes_fail_the_pod(kubectl, namespace, pod_runner):
    nfs = {"volumes": [{"name": "data", "nfs": {"server": "nfs.example", "path": "/"}}]}
    pods = [bare_pod(namespace, "exits-3", ["sh", "-c", "exit 3"]),
            bare_pod(namespace, "needs-nfs", ["true"], **nfs)]
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))
    for name in ("exits-3", "needs-nfs"):
        kubectl("wait", "--for=jsonpath={.status.phase}=Failed", f"pod/{name}", "-n", namespace, "--timeout=120s")

    exited = get_json(kubectl, "pod/exits-3", "-n", namespace)["status"]
    assert exited["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert exited["containerStatuses"][0]["state"]["terminated"]["reason"] == "Error"
    refused = get_json(kubectl, "pod/needs-nfs", "-n", namespace)["status"]
    assert refused["message"] == "volume 'data' of type nfs is not supported by the pod runner"


@pytest.mark.cluster
@pytest.mark.slow
def test_deleting_a_running_pod_stops_its_process(kubectl, namespace, pod_runner, tmp_path):
    marker = tmp_path / "stopped"
    # The shell's trap runs on the runner's SIGTERM, as a container's would on the kubelet's.
    kubectl("apply", "-f", "-", input=json.dumps(bare_pod(
        namespace, "sleeper", ["sh", "-c", f"trap 'touch {marker}; exit 0' TERM; while true; do sleep 0.2; done"],
        terminationGracePeriodSeconds=10)))
    kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod/sleeper", "-n", namespace, "--timeout=120s")
    kubectl("delete", "pod", "sleeper", "-n", namespace, "--timeout=60s")
    assert marker.exists()


def test_container_paths_and_rendezvous_names_are_rewritten_as_whole_names():
    rewrite = pod_runner_module.make_rewriter(
        {"/output": "/tmp/p/volumes/out", "/etc/rmjob/": "/tmp/p/volumes/config", "/etc": "/tmp/p/volumes/etc"},
        ["rm-a"], "team")
    assert rewrite("output_dir: /output") == "output_dir: /tmp/p/volumes/out"
    assert rewrite("--config=/etc/rmjob/trainer.yaml") == "--config=/tmp/p/volumes/config/trainer.yaml"
    assert rewrite("/etc/hosts") == "/tmp/p/volumes/etc/hosts"  # the longest mount path wins
    # Not a mount path: another directory's /output, or /output as a name's prefix.
    assert rewrite("/data/output /outputs ./output") == "/data/output /outputs ./output"
    assert rewrite("rm-a-0.rm-a:29500 rm-a-1.rm-a.team.svc.cluster.local") == "127.0.0.1:29500 127.0.0.1"
    # Another Service's pods, and names that merely start like the Service's, stay as they are.
    assert rewrite("x-0.other rm-a-0.rm-ab rm-a-0.rm-a.example.com") == "x-0.other rm-a-0.rm-ab rm-a-0.rm-a.example.com"


def test_downward_api_fields_and_env_expansion():
    pod = {"metadata": {"name": "p", "namespace": "n", "uid": "u", "annotations": {"a/b": "1"}},
           "spec": {"nodeName": "runner-0"}}
    assert pod_runner_module.field_value(pod, "metadata.annotations['a/b']") == "1"
    assert pod_runner_module.field_value(pod, "metadata.labels['missing']") == ""
    assert pod_runner_module.field_value(pod, "spec.nodeName") == "runner-0"
    with pytest.raises(pod_runner_module.PodUnsupported, match="status.podIPs"):
        pod_runner_module.field_value(pod, "status.podIPs")
    assert pod_runner_module.expand("$(A)-$(B)-$$(A)", {"A": "x"}) == "x-$(B)-$(A)"


@pytest.mark.cluster
@pytest.mark.slow
def test_pods_sent_to_runner_nodes_in_general_stay_off_this_runners_node(kubectl, pod_runner):
    """Another runner's namespace (RUNNER_NAMESPACE_ANNOTATIONS alone) may not borrow this node:
    it carries a taint of its own that only its namespace_annotations() tolerate."""
    other = f"t-other-{pod_runner.node[-10:]}"
    kubectl("create", "namespace", other)
    try:
        kubectl("annotate", "namespace", other,
                *(f"{k}={v}" for k, v in local_cluster.RUNNER_NAMESPACE_ANNOTATIONS.items()))
        kubectl("wait", "--for=create", "serviceaccount/default", "-n", other, "--timeout=60s")
        kubectl("apply", "-f", "-", input=json.dumps(bare_pod(other, "probe", ["true"])))
        # The scheduler's verdict: bound elsewhere (another runner's node) or unschedulable.
        kubectl("wait", "--for=condition=PodScheduled=False", "pod/probe", "-n", other, "--timeout=60s", check=False)
        pod = get_json(kubectl, "pod/probe", "-n", other)
        assert [c["type"] for c in pod["status"].get("conditions", [])] == ["PodScheduled"]
        assert pod["spec"].get("nodeName") != pod_runner.node
    finally:
        kubectl("delete", "namespace", other, "--wait=false", check=False)


def own_runner(cluster, kubectl, namespace: str, workdir) -> pod_runner_module.PodRunner:
    """A started runner (not the ``pod_runner`` fixture) whose stop a test observes."""
    runner = pod_runner_module.PodRunner(cluster, f"runner-{namespace}", workdir)
    runner.start()
    kubectl("annotate", "--overwrite", "namespace", namespace,
            *(f"{key}={value}" for key, value in runner.namespace_annotations().items()))
    return runner


@pytest.mark.cluster
@pytest.mark.slow
def test_stopping_the_runner_removes_only_its_own_directory(cluster, kubectl, namespace, tmp_path):
    shared = tmp_path / "shared"
    (shared / "thesis").mkdir(parents=True)
    (shared / "thesis" / "ch1.tex").write_text("chapter 1")
    runner = own_runner(cluster, kubectl, namespace, shared)
    try:
        kubectl("apply", "-f", "-", input=json.dumps(bare_pod(namespace, "done", ["true"])))
        kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/done", "-n", namespace, "--timeout=120s")
        assert (runner.workdir / namespace / "done" / "logs").is_dir()
    finally:
        runner.stop()
    assert not runner.workdir.exists()
    assert (shared / "thesis" / "ch1.tex").read_text() == "chapter 1"

    # A directory the runner created itself goes when it is left empty.
    created = tmp_path / "created"
    runner = own_runner(cluster, kubectl, namespace, created)
    runner.stop()
    assert not created.exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_a_container_stopped_by_a_signal_reports_128_plus_the_signal(cluster, kubectl, namespace, tmp_path):
    runner = own_runner(cluster, kubectl, namespace, tmp_path / "pods")
    try:
        kubectl("apply", "-f", "-", input=json.dumps(bare_pod(namespace, "sleeper", ["sleep", "600"])))
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod/sleeper", "-n", namespace, "--timeout=120s")
    finally:
        runner.stop()  # SIGTERM to the pod's processes, as a kubelet stopping a container
    status = get_json(kubectl, "pod/sleeper", "-n", namespace)["status"]
    assert status["phase"] == "Failed"
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 128 + 15


def test_exit_code_of_a_killed_process_is_128_plus_the_signal():
    process = subprocess.Popen(["sleep", "600"])
    assert pod_runner_module.exit_code(process) is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert pod_runner_module.exit_code(process) == 137
    exited = subprocess.Popen(["sh", "-c", "exit 3"])
    exited.wait()
    assert pod_runner_module.exit_code(exited) == 3


def process_gone(pid: int) -> bool:
    """Ended (a zombie nobody reaped counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.cluster
@pytest.mark.slow
def test_a_sigkilled_runner_takes_its_pods_processes_along_and_its_successor_takes_the_node_over(
        cluster, kubectl, namespace, tmp_path):
    node = f"runner-{namespace}"
    cli = subprocess.Popen([sys.executable, str(REPO / "hack" / "cluster" / "pod_runner.py"),
                            "--dir", str(cluster.dir), "--node", node, "--namespace", namespace,
                            "--workdir", str(tmp_path / "pods")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kubectl("wait", "--for=create", f"node/{node}", "--timeout=60s")
        # A process tree: the shell and its background child both have to die with the runner.
        child_pid = tmp_path / "child.pid"
        kubectl("apply", "-f", "-", input=json.dumps(bare_pod(
            namespace, "tree", ["sh", "-c", f"sleep 600 & echo $! > {child_pid}; wait"])))
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "pod/tree", "-n", namespace, "--timeout=120s")
        deadline = time.monotonic() + 30
        while not child_pid.exists() or not child_pid.read_text().strip():
            assert time.monotonic() < deadline, "the pod's shell never started its child"
            time.sleep(0.2)
        sleep_pid = int(child_pid.read_text())
    finally:
        cli.kill()
        cli.wait()
    deadline = time.monotonic() + 30
    while not process_gone(sleep_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process_gone(sleep_pid), "the pod's process outlived its SIGKILLed runner"

    successor = own_runner(cluster, kubectl, namespace, tmp_path / "pods")
    try:
        pod = get_json(kubectl, "pod/tree", "-n", namespace)
        assert pod["status"]["phase"] == "Failed"
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
        # The node is the successor's: its pods run.
        kubectl("apply", "-f", "-", input=json.dumps(bare_pod(namespace, "after", ["true"])))
        kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/after", "-n", namespace, "--timeout=120s")
    finally:
        successor.stop()


@pytest.mark.cluster
@pytest.mark.slow
def test_env_from_config_maps_and_secrets_with_prefix_optional_and_env_precedence(kubectl, namespace, pod_runner):
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": namespace},
              "data": {"FROM_CM": "cm-value", "SHARED": "from-configmap", "LEVEL": "cm"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": namespace},
              "stringData": {"TOKEN": "s3cret", "LEVEL": "secret"}}
    names = ["FROM_CM", "SHARED", "LEVEL", "S_TOKEN", "S_LEVEL", "DERIVED"]
    pod = bare_pod(namespace, "env-from", ["python", "-c", f"import json, os; print(json.dumps("
                                           f"{{k: os.environ.get(k) for k in {names!r}}}))"])
    pod["spec"]["containers"][0].update(
        envFrom=[{"configMapRef": {"name": "settings"}},
                 {"configMapRef": {"name": "absent", "optional": True}},
                 {"secretRef": {"name": "creds"}, "prefix": "S_"},
                 {"configMapRef": {"name": "settings"}, "prefix": "S_"}],  # a later source wins
        env=[{"name": "SHARED", "value": "from-env"}, {"name": "DERIVED", "value": "x=$(FROM_CM)"}])
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [config, secret, pod]}))
    kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/env-from", "-n", namespace, "--timeout=120s")
    printed = json.loads(pod_log(pod_runner, namespace, "env-from").strip().splitlines()[-1])
    assert printed == {"FROM_CM": "cm-value", "SHARED": "from-env", "LEVEL": "cm", "S_TOKEN": "s3cret",
                       "S_LEVEL": "cm", "DERIVED": "x=cm-value"}


@pytest.mark.cluster
@pytest.mark.slow
def test_env_from_a_missing_config_map_fails_the_pod_naming_it(kubectl, namespace, pod_runner):
    pod = bare_pod(namespace, "no-settings", ["true"])
    pod["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "absent"}}]
    kubectl("apply", "-f", "-", input=json.dumps(pod))
    kubectl("wait", "--for=jsonpath={.status.phase}=Failed", "pod/no-settings", "-n", namespace, "--timeout=120s")
    assert "configMap 'absent'" in get_json(kubectl, "pod/no-settings", "-n", namespace)["status"]["message"]


@pytest.mark.cluster
@pytest.mark.slow
def test_a_config_map_mounted_by_two_containers_is_rewritten_once_for_each(kubectl, namespace, pod_runner):
    """Each container has an emptyDir of its own at the top directory of the pod directories
    (/tmp for pytest's): a second rewrite of the shared file would rewrite the first one's host path."""
    top = "/" + pod_runner.workdir.parts[1]
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": namespace},
              "data": {"f": f"scratch={top}/scratch"}}
    containers = [{"name": name, "image": "busybox:1.37", "command": ["cat", "/etc/cfg/f"],
                   "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"},
                                    {"name": f"tmp{name}", "mountPath": top}]}
                  for name in ("a", "b")]
    pod = bare_pod(namespace, "two", [], volumes=[{"name": "cfg", "configMap": {"name": "cfg"}},
                                                  {"name": "tmpa", "emptyDir": {}}, {"name": "tmpb", "emptyDir": {}}])
    pod["spec"]["containers"] = containers
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [config, pod]}))
    kubectl("wait", "--for=jsonpath={.status.phase}=Succeeded", "pod/two", "-n", namespace, "--timeout=120s")
    volumes = pod_runner.workdir / namespace / "two" / "volumes"
    for name in ("a", "b"):
        assert pod_runner.log(namespace, "two", name) == f"scratch={volumes / f'tmp{name}'}/scratch"


def test_buildah_run_looks_in_the_store_buildah_from_used(monkeypatch):
    """Image mode: a `buildah run` given only PATH looked in the default store for the working
    container `buildah from` had made in the one CONTAINERS_STORAGE_CONF (or a rootless HOME)
    names: "container not known"."""
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", "/srv/containers/storage.conf")
    monkeypatch.setenv("HOME", "/home/dev")
    monkeypatch.setenv("RMJOB_TEST_SECRET", "s3cret")
    env = pod_runner_module.buildah_env()
    assert env["CONTAINERS_STORAGE_CONF"] == "/srv/containers/storage.conf" and env["HOME"] == "/home/dev"
    assert "RMJOB_TEST_SECRET" not in env and env["PATH"]
