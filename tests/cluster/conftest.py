"""Fixtures for tests against the local Kubernetes control plane (hack/cluster/cluster.py).

One cluster serves the whole run, pytest-xdist workers included: each worker attaches to it
(the first one starts it, under a file lock) and detaches at the end of its session; the last
one stops it. A cluster started by hand (`make cluster-up`) is reused and left running.
Tests share it, so each works in a namespace of its own (`namespace` fixture) and treats
cluster-scoped objects (the CRD, nodes) as shared.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KUBECTL = REPO / ".tools" / "bin" / "kubectl"


def _load_cluster_module():
    spec = importlib.util.spec_from_file_location("rmjob_local_cluster", REPO / "hack" / "cluster" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


local_cluster = _load_cluster_module()


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


@pytest.fixture
def namespace(kubectl):
    """A fresh namespace for one test, deleted afterwards (without waiting for it to go)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl("create", "namespace", name)
    # Pods need the namespace's default ServiceAccount, which a controller creates.
    kubectl("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=60s")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)
