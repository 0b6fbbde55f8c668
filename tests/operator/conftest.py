"""Fixtures: a KMock cluster with our CRD (optionally Kubeflow's PyTorchJob CRD) and the operator."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import pytest
from kmock_cluster import PYTORCHJOB_CRD, Cluster, emulated_cluster, load_yaml, running_operator


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> AsyncIterator[Cluster]:
    """An empty cluster with the built-in resources and the RewardModelJob CRD; KUBECONFIG points to it."""
    async with emulated_cluster(Cluster, monkeypatch, tmp_path) as emulator:
        yield emulator


@pytest.fixture
def with_pytorchjob_crd(cluster: Cluster) -> Cluster:
    cluster.register_crd(load_yaml(PYTORCHJOB_CRD))
    return cluster


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[asyncio.Task]:
    async with running_operator() as task:
        yield task
