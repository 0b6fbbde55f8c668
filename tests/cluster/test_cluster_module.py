"""hack/cluster/cluster.py's refusals and the skip rule, without starting anything."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import local_cluster, toolchain_verdict


def fake_bin_dir(tmp_path, *, without: str | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in local_cluster.BINARIES:
        if name != without:
            (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
            (bin_dir / name).chmod(0o755)
    return bin_dir


def test_a_missing_binary_is_named_and_nothing_starts(tmp_path):
    cluster = local_cluster.Cluster(tmp_path / "state", fake_bin_dir(tmp_path, without="kube-scheduler"))
    with pytest.raises(local_cluster.ClusterError, match=r"bin/kube-scheduler is missing; build it with `make install`"):
        cluster.up()
    assert cluster.state() is None


def test_a_taken_port_is_named_and_nothing_starts(tmp_path):
    cluster = local_cluster.Cluster(tmp_path / "state", fake_bin_dir(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(local_cluster.ClusterError, match=rf"^port {port} on 127.0.0.1 \(for apiserver\) is taken"):
            cluster.up(port_base=port)
    assert cluster.state() is None


def tree(root):
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def test_down_without_a_cluster_is_a_no_op(tmp_path):
    """Nothing is created where no state directory exists, and of a state directory only
    cluster.py's own entries go: whatever else lies there stays byte for byte."""
    before = tree(tmp_path)
    local_cluster.Cluster(tmp_path / "state", fake_bin_dir(tmp_path)).down()
    assert not (tmp_path / "state").exists()

    state_dir = tmp_path / "used"
    state_dir.mkdir()
    (state_dir / local_cluster.MARKER).write_text("")
    for own in ("logs", "pki", "etcd"):
        (state_dir / own).mkdir()
        (state_dir / own / "file").write_text("x")
    (state_dir / "kubeconfig").write_text("x")
    (state_dir / "notes.txt").write_text("kept")
    (state_dir / "work").mkdir()
    (state_dir / "work" / "main.go").write_text("kept too")
    local_cluster.Cluster(state_dir).down()
    assert tree(state_dir) == {local_cluster.MARKER: b"", ".lock": b"", "notes.txt": b"kept",
                               "work": None, "work/main.go": b"kept too"}
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("used")} == {**before, "bin": None,
        **{f"bin/{n}": b"#!/bin/sh\nexit 1\n" for n in local_cluster.BINARIES}}


@pytest.mark.parametrize("command", ["up", "down"])
def test_a_non_empty_directory_without_the_marker_is_refused_and_left_alone(tmp_path, command):
    victim = tmp_path / "victim"
    (victim / "project" / "src").mkdir(parents=True)
    (victim / "notes.txt").write_text("precious")
    (victim / "project" / "src" / "main.go").write_text("code")
    before = tree(victim)
    cluster = local_cluster.Cluster(victim, tmp_path / "no-bin")
    with pytest.raises(local_cluster.ClusterError, match=r"is not empty and is no cluster state directory "
                                                         r"\(no \.rmjob-cluster in it\); pass an empty or new --dir$"):
        getattr(cluster, command)()
    assert tree(victim) == before


@pytest.mark.parametrize(("args", "message"), [
    (["--port-base", "65533"], "error: --port-base 65533: the cluster uses ports BASE..BASE+5, so BASE must be between 1 and 65530"),
    (["--port-base", "-5"], "error: --port-base -5: the cluster uses ports BASE..BASE+5, so BASE must be between 1 and 65530"),
    (["--nodes", "-1"], "error: --nodes -1: the number of KWOK nodes cannot be negative"),
])
def test_bad_arguments_are_one_line_and_create_nothing(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(local_cluster.REPO / "hack" / "cluster" / "cluster.py"), "up",
                             "--dir", str(tmp_path / "state"), *args], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr, result.stdout) == (1, message + "\n", "")
    assert not (tmp_path / "state").exists()


# --- components identified by pid, start time and command line, without a real cluster ------

def fake_component(cluster, bin_dir, name):
    """A process whose command line looks like cluster's NAME (argv[0] .../NAME, its identifying
    argument), sleeping; the test process is its parent, so a stopped one is reaped by poll()."""
    return subprocess.Popen([str(bin_dir / name), "-c", "import time; time.sleep(600)",
                             cluster._identifying_arg(name)], executable=sys.executable)


def fake_cluster(tmp_path, name, *, owner="tests"):
    """CLUSTER with every component faked and recorded in its state.json: (cluster, processes)."""
    cluster = local_cluster.Cluster(tmp_path / name, tmp_path / "bin")
    with cluster.locked():
        pass
    processes = {component: fake_component(cluster, tmp_path / "bin", component) for component in local_cluster.BINARIES}
    deadline = time.monotonic() + 30
    while not all(cluster._is_component(p.pid, c) for c, p in processes.items()):  # until exec'd
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cluster._write_state({"owner": owner, "ports": vars(local_cluster.Ports.free()), "nodes": 0, "version": "v0",
                          "pids": {c: {"pid": p.pid, "start": local_cluster._process_start(p.pid)}
                                   for c, p in processes.items()}})
    return cluster, processes


@pytest.fixture
def stop_fakes():
    started = []
    yield started.extend
    for process in started:
        process.kill()
        process.wait()


def alive(processes):
    return {name for name, process in processes.items() if process.poll() is None}


def test_down_without_state_json_stops_this_directorys_components_and_no_others(tmp_path, stop_fakes):
    mine, my_processes = fake_cluster(tmp_path, "mine")
    other, other_processes = fake_cluster(tmp_path, "mine-other")  # a name sharing a prefix
    stop_fakes([*my_processes.values(), *other_processes.values()])
    mine.state_file.unlink()
    mine.down()
    assert alive(my_processes) == set()
    assert alive(other_processes) == set(local_cluster.BINARIES)


def test_a_stale_state_json_never_stops_another_clusters_processes(tmp_path, stop_fakes):
    other, other_processes = fake_cluster(tmp_path, "other")
    stop_fakes(other_processes.values())
    stale = local_cluster.Cluster(tmp_path / "stale")
    with stale.locked():
        pass
    stale.state_file.write_text(other.state_file.read_text())  # a copied tree: same pids and start times
    assert stale._dead(stale.state()) == list(local_cluster.BINARIES)
    assert not stale.running()
    stale.down()
    assert alive(other_processes) == set(local_cluster.BINARIES)


def dead_process_start():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    start = local_cluster._process_start(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.pid, start


def test_users_that_died_or_whose_pid_was_reused_do_not_keep_a_test_cluster_alive(tmp_path, stop_fakes):
    cluster, processes = fake_cluster(tmp_path, "state")
    stop_fakes(processes.values())
    cluster.users_dir.mkdir()
    pid, start = dead_process_start()  # a SIGKILLed session
    (cluster.users_dir / str(pid)).write_text(start)
    # A dead session's pid now used by another live process (pid 1 stands in for it).
    (cluster.users_dir / "1").write_text(local_cluster._process_start(1).split()[0] + " 999999999")
    assert cluster.detach() is True
    assert alive(processes) == set()
    assert cluster.state() is None and not cluster.users_dir.exists()


def test_a_live_user_keeps_a_test_cluster_alive(tmp_path, stop_fakes):
    cluster, processes = fake_cluster(tmp_path, "state")
    stop_fakes(processes.values())
    cluster.users_dir.mkdir()
    (cluster.users_dir / "1").write_text(local_cluster._process_start(1))
    assert cluster.detach() is False
    assert alive(processes) == set(local_cluster.BINARIES)
    assert cluster.state() is not None


@pytest.mark.parametrize(("missing", "go_found", "ci", "expected"), [
    ([], False, True, None),
    (["etcd"], False, False, "skip"),
    (["etcd"], False, True, "fail"),
    (["etcd"], True, False, "fail"),
])
def test_toolchain_rule(missing, go_found, ci, expected):
    verdict = toolchain_verdict(missing, go_found, ci)
    assert (verdict[0] if verdict else None) == expected


def make_dry_run(target, **env):
    result = subprocess.run(["make", "-n", "-C", str(local_cluster.REPO), target], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_test_fast_does_not_build_the_control_plane_and_make_test_does():
    assert "hack/k8s/build.sh" not in make_dry_run("test-fast", CI="true")
    assert "pytest" in make_dry_run("test-fast", CI="true")
    assert "hack/k8s/build.sh" in make_dry_run("test")


def test_the_demo_uses_the_cluster_as_a_registered_user(monkeypatch):
    """demo.py attaches and detaches like a test session, so a session's last detach cannot stop
    the cluster under the demo, nor the demo stop it under a session."""
    spec = importlib.util.spec_from_file_location("rmjob_cluster_demo", local_cluster.REPO / "hack" / "cluster" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    calls = []

    class RecordingCluster:
        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append(name) or (name == "attach")

    cluster_module = demo.local_cluster
    monkeypatch.setattr(cluster_module, "Cluster", RecordingCluster)
    monkeypatch.setattr(demo, "run_demo", lambda cluster: calls.append("run_demo") or 0)
    monkeypatch.setattr(demo, "kubectl", lambda *args, **kwargs: "")
    assert demo.main() == 0
    assert calls == ["attach", "run_demo", "detach"]


# --- hack/k8s/build.sh, with a fake go that records what it is asked -------------------------

FAKE_GO = """#!/bin/bash
echo "$*" >> "$GO_LOG"
case "$1" in
  list) [[ " $FAIL_MODULE " == *" ${@: -1} "* ]] && { echo "go: module lookup disabled by GOPROXY=off" >&2; exit 1; }
        case "${@: -1}" in k8s.io/kubernetes) echo v1.35.4;; go.etcd.io/etcd/server/v3) echo v3.6.5;; *) echo v0.8.0;; esac;;
  env) shift; for v in "$@"; do case $v in GOVERSION) echo "${FAKE_GOVERSION:-go1.26.0}";; *) echo "$v-value";; esac; done;;
  build) while [[ $1 != -o ]]; do shift; done; printf '#!/bin/sh\\necho built\\n' > "$2"; chmod +x "$2";;
esac
"""


@pytest.fixture
def build_script(tmp_path):
    """A copy of hack/k8s (build.sh, each module's go.mod/go.sum) run with the fake go:
    run(**env) -> (CompletedProcess, the binaries `go build` was asked for)."""
    k8s = tmp_path / "k8s"
    for module in ("kubernetes", "etcd", "kwok"):
        (k8s / module).mkdir(parents=True)
        for name in ("go.mod", "go.sum"):
            (k8s / module / name).write_bytes((local_cluster.REPO / "hack" / "k8s" / module / name).read_bytes())
    (k8s / "build.sh").write_bytes((local_cluster.REPO / "hack" / "k8s" / "build.sh").read_bytes())
    (k8s / "build.sh").chmod(0o755)
    (tmp_path / "gobin").mkdir()
    (tmp_path / "gobin" / "go").write_text(FAKE_GO)
    (tmp_path / "gobin" / "go").chmod(0o755)
    log = tmp_path / "go.log"

    def run(**env):
        log.write_text("")
        result = subprocess.run([str(k8s / "build.sh"), str(tmp_path / "bin")], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "PATH": f"{tmp_path / 'gobin'}:/usr/bin:/bin",
                                                 "GO_LOG": str(log), **env})
        built = [line.split()[-2].rsplit("/", 1)[1] for line in log.read_text().splitlines() if line.startswith("build ")]
        return result, built

    run.k8s = k8s
    run.bin = tmp_path / "bin"
    return run


def test_build_sh_rebuilds_when_what_a_binary_was_built_from_changes(build_script):
    # Binaries that claim the pinned version but carry no stamp (the reviewer's case) are rebuilt.
    build_script.bin.mkdir()
    for name, version in (("kube-apiserver", "Kubernetes v1.35.4"), ("kube-controller-manager", "Kubernetes v1.35.4"),
                          ("kube-scheduler", "Kubernetes v1.35.4"), ("etcd", "etcd Version: 3.6.5"),
                          ("kwok", "kwok version v0.8.0")):
        (build_script.bin / name).write_text(f"#!/bin/sh\necho '{version}'\n")
        (build_script.bin / name).chmod(0o755)
    result, built = build_script()
    assert result.returncode == 0, result.stderr
    assert sorted(built) == sorted(local_cluster.BINARIES)

    assert build_script()[1] == []
    with open(build_script.k8s / "etcd" / "go.sum", "a") as go_sum:
        go_sum.write("example.com/changed v1.0.0 h1:AAAA=\n")
    assert build_script()[1] == ["etcd"]
    assert sorted(build_script(FAKE_GOVERSION="go1.27.0")[1]) == sorted(local_cluster.BINARIES)
    assert build_script(FAKE_GOVERSION="go1.27.0", GOFLAGS="-buildvcs=false")[1] == \
        ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kwok"]


def test_build_sh_names_the_module_it_cannot_resolve(build_script):
    result, built = build_script(FAIL_MODULE="go.etcd.io/etcd/server/v3")
    assert result.returncode != 0 and built == ["kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot resolve go.etcd.io/etcd/server/v3 in module hack/k8s/etcd (Go module proxy unreachable "
        "and not in the module cache?); go's message is above")


@pytest.mark.parametrize("left", [[".lock"], [".lock", "state.json", "logs", "pki", "users"]])
def test_a_state_directory_from_before_the_marker_is_still_recognized(tmp_path, left):
    """What cluster.py left before it wrote a marker (.cluster/ after `down`, or of a running cluster)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    for name in left:
        (state_dir / name).mkdir() if name in ("logs", "pki", "users") else (state_dir / name).write_text("{}")
    local_cluster.Cluster(state_dir).down()
    assert sorted(p.name for p in state_dir.iterdir()) == [".lock", local_cluster.MARKER]
