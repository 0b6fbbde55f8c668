"""Fixtures: a KMock cluster with our CRD (optionally Kubeflow's PyTorchJob CRD) and the operator."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import kmock
import pytest
import yaml
from kmock_cluster import NAMESPACE, OUR_CRD, PYTORCHJOB_CRD, Cluster, load_yaml, running_operator


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> AsyncIterator[Cluster]:
    """An empty cluster with the built-in resources and the RewardModelJob CRD; KUBECONFIG points to it."""
    async with Cluster() as emulator, kmock.Server(emulator):
        emulator.resources.load_bundled()
        emulator.register_crd(load_yaml(OUR_CRD))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url)}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NAMESPACE}}],
            "users": [{"name": "kmock", "user": {}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield emulator


@pytest.fixture
def with_pytorchjob_crd(cluster: Cluster) -> Cluster:
    cluster.register_crd(load_yaml(PYTORCHJOB_CRD))
    return cluster


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[asyncio.Task]:
    async with running_operator() as task:
        yield task


