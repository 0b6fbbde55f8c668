"""hack/cluster/cluster.py's refusals and the skip rule, without starting anything."""

from __future__ import annotations

import socket

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


def test_down_without_a_cluster_is_a_no_op(tmp_path):
    cluster = local_cluster.Cluster(tmp_path / "state", fake_bin_dir(tmp_path))
    cluster.down()
    assert not cluster.running()


@pytest.mark.parametrize(("missing", "go_found", "ci", "expected"), [
    ([], False, True, None),
    (["etcd"], False, False, "skip"),
    (["etcd"], False, True, "fail"),
    (["etcd"], True, False, "fail"),
])
def test_toolchain_rule(missing, go_found, ci, expected):
    verdict = toolchain_verdict(missing, go_found, ci)
    assert (verdict[0] if verdict else None) == expected
