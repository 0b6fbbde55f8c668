"""Fixtures for tests against the local Kubernetes control plane (hack/cluster/cluster.py).

One cluster serves the whole run, pytest-xdist workers included: each worker attaches to it
(the first one starts it, under a file lock) and detaches at the end of its session; the last
one stops it. A cluster started by hand (`make cluster-up`) is reused and left running.
Tests share it, so each works in a namespace of its own (`namespace` fixture) and treats
cluster-scoped objects (the CRD, nodes) as shared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from operator_harness import CRD_MANIFEST, OperatorIdentity, OperatorProcess, namespace_fixture
from rmj import wait_established

REPO = Path(__file__).resolve().parents[2]
KUBECTL = REPO / ".tools" / "bin" / "kubectl"
# hack/cluster's modules by their own names, as bench/operator_bench.py, demo.py and pod_runner.py
# import them: one module object each in the process, whoever imports it first.
sys.path.insert(0, str(REPO / "hack" / "cluster"))
import cluster as local_cluster  # noqa: E402
import pod_runner as pod_runner_module  # noqa: E402


def toolchain_verdict(missing: list[str], go_found: bool, ci: bool) -> tuple[str, str] | None:
    """What to do when control-plane binaries are missing: ("skip" | "fail", one-line reason)."""
    if not missing:
        return None
    if not go_found and not ci:
        return "skip", "needs the local Kubernetes control plane: go is not on PATH to build it (make install)"
    if not go_found:
        return "fail", "CI is set but go is not on PATH: the local Kubernetes control plane cannot be built"
    return "fail", f"{', '.join(missing)} missing from .tools/bin: run make install (builds them with go)"


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def cluster():
    """The running control plane (a hack/cluster/cluster.py Cluster); admin kubeconfig at
    `cluster.kubeconfig`."""
    control_plane = local_cluster.Cluster()
    missing = [name for name in local_cluster.BINARIES if not os.access(control_plane.bin / name, os.X_OK)]
    verdict = toolchain_verdict(missing, shutil.which("go") is not None, _ci())
    if verdict:
        action, reason = verdict
        (pytest.skip if action == "skip" else pytest.fail)(reason)
    try:
        control_plane.attach()
    except local_cluster.ClusterError as error:
        pytest.fail(f"cluster start failed: {error}", pytrace=False)
    yield control_plane
    control_plane.detach()


@pytest.fixture(scope="session")
def kubectl(cluster):
    """Runs the real kubectl (admin unless `kubeconfig=` names another identity)."""

    def run(*args: str, input: str | None = None, kubeconfig: Path | None = None, check: bool = True):
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or cluster.kubeconfig)}
        # Longer than any `kubectl wait --timeout` a test passes, so kubectl reports its own timeout.
        result = subprocess.run([str(KUBECTL), *args], input=input, capture_output=True, text=True,
                                timeout=300, env=env)
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}", pytrace=False)
        return result

    return run


namespace = namespace_fixture()  # a fresh one for each test


# --- the operator as a real process, with only the chart's RBAC (issue 8) -------------------

@pytest.fixture(scope="session")
def rmj_crd(kubectl):
    """manifests/crd.yaml installed and Established (server-side apply: workers race safely)."""
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=rmjob-tests", "-f", str(CRD_MANIFEST))
    wait_established(kubectl, "rewardmodeljobs.rmjob.dev")


@pytest.fixture(scope="session")
def operator_identity(cluster, kubectl, rmj_crd, tmp_path_factory):
    """The identity the chart's default install gives the operator (its ClusterRole only)."""
    identity = OperatorIdentity(cluster, kubectl, tmp_path_factory.mktemp("operator-identity"))
    yield identity
    identity.delete()


@pytest.fixture(scope="session")
def start_operator(cluster, kubectl, rmj_crd, tmp_path_factory):
    """``start_operator(namespaces, *args, identity=None, kubeconfig=None)``: a started
    OperatorProcess watching ``namespaces``. By default it runs as the identity the chart gives
    an operator confined to them (watchNamespaces: a Role in each and a ClusterRole of
    cluster-scoped reads), the only way the chart runs ``--namespace``. All are stopped, and
    those identities deleted, at the end."""
    started: list[OperatorProcess] = []
    identities: list[OperatorIdentity] = []
    workdir = tmp_path_factory.mktemp("operators")

    def start(namespaces: list[str], *args: str, identity: OperatorIdentity | None = None,
              kubeconfig: Path | None = None) -> OperatorProcess:
        if kubeconfig is None:
            if identity is None:
                identity = OperatorIdentity(cluster, kubectl, workdir, f"watchNamespaces={{{','.join(namespaces)}}}")
                identities.append(identity)
            kubeconfig = identity.kubeconfig
        process = OperatorProcess(kubeconfig, namespaces, workdir / f"operator-{len(started)}.log", *args).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    for identity in identities:
        identity.delete()


# --- the pod runner: pods of a namespace run as local processes (issue 8) --------------------

@pytest.fixture
def pod_runner(cluster, kubectl, namespace, tmp_path):
    """A hack/cluster/pod_runner.py PodRunner on a node of its own, running every pod of the
    test's ``namespace``; stopped (processes, node, pod directories) at the end."""
    runner = pod_runner_module.PodRunner(cluster, f"runner-{namespace}", tmp_path / "pods")
    with runner:
        kubectl("annotate", "namespace", namespace,
                *(f"{key}={value}" for key, value in runner.namespace_annotations().items()))
        yield runner


# --- the built images, run from local containers storage (issue 13) --------------------------

BUILD_IMAGES = REPO / "hack" / "images" / "build.sh"
OPERATOR_IMAGE = "localhost/rmjob-operator:dev"
TRAINER_IMAGE = "localhost/rmjob-trainer:dev-cpu"
IMAGE_UID = 10001  # USER of both Dockerfiles
# A cold trainer build downloads ~3.5 GB of torch and CUDA wheels; a cached one takes seconds.
IMAGE_BUILD_TIMEOUT_S = 3600


def _why_no_container_tools() -> str | None:
    if shutil.which("podman") and shutil.which("buildah"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return None  # build.sh installs them
    return "podman/buildah missing and not installable here (needs root and apt-get); CI is not set"


def built_image(target: str, image: str) -> str:
    """``image``, built (or found up to date) by hack/images/build.sh; skipped as test_images.py
    does when the tools cannot be had and CI is not set."""
    if (reason := _why_no_container_tools()) and not _ci():
        pytest.skip(reason)
    result = subprocess.run([str(BUILD_IMAGES), target], capture_output=True, text=True,
                            timeout=IMAGE_BUILD_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"hack/images/build.sh {target} exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}", pytrace=False)
    return image


@pytest.fixture(scope="session")
def operator_image() -> str:
    return built_image("operator", OPERATOR_IMAGE)


@pytest.fixture(scope="session")
def trainer_image() -> str:
    return built_image("trainer", TRAINER_IMAGE)


@pytest.fixture
def image_pod_runner(cluster, kubectl, namespace, tmp_path):
    """Like ``pod_runner``, in image mode: each container runs in its image (buildah run)."""
    runner = pod_runner_module.PodRunner(cluster, f"runner-{namespace}", tmp_path / "pods", images=True)
    with runner:
        kubectl("annotate", "namespace", namespace,
                *(f"{key}={value}" for key, value in runner.namespace_annotations().items()))
        yield runner


@pytest.fixture
def host_rendezvous_port():
    """Held while a test trains: runner pods share the host network, so two trainings at once
    (one per xdist worker) would both bind torchrun's rendezvous port 29500."""
    import fcntl

    with open("/tmp/rmjob-tests-host-port-29500.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield 29500
