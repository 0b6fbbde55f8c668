"""Operator replicas in a kopf peering group: exactly one of them handles the jobs."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib

import kmock
import pytest
from kmock_cluster import (
    JOBS, KOPF_PEERING_CRDS, NAMESPACE, OUR_CRD, Cluster, api, emulated_cluster, new_job, rmj, rmj_path,
    running_operator, wait_for,
)

PEERING = "rmjob-operator"
PEERING_PATH = f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings"


async def test_of_two_replicas_exactly_one_handles_the_jobs(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: pathlib.Path) -> None:
    """Emulates the chart with ``peering.enabled=true, replicaCount=2`` (or one replica's
    rolling update): two real kopf operators, each with its own identity, share the
    KopfPeering object the chart creates, against KMock serving kopf's peering CRDs. kopf
    pauses every operator that sees a live peer of its own priority; with distinct
    priorities the lower one pauses and the other one creates the job's children, once.
    Also worth running against the real control plane with the chart's two replicas."""
    async with emulated_cluster(Cluster, monkeypatch, tmp_path, crds=(OUR_CRD, KOPF_PEERING_CRDS)) as cluster:
        await api(cluster, "post", PEERING_PATH, {
            "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING, "namespace": NAMESPACE},
        })
        async with contextlib.AsyncExitStack() as replicas:
            for identity in ("replica-a", "replica-b"):
                await replicas.enter_async_context(running_operator(peering=PEERING, identity=identity))
            await wait_for(lambda: len(peers_of(cluster)) == 2, message="both replicas in the peering object")
            await asyncio.sleep(0.5)  # each replica has seen the other's keep-alive and paused or not

            await api(cluster, "post", rmj_path(), new_job())
            await wait_for(lambda: (rmj(cluster).get("status") or {}).get("workload"), message="the job handled")
            await asyncio.sleep(0.5)  # time for a second replica to try the same
            job_creates = [r for r in cluster if r.method == kmock.method.POST and r.url.path.endswith("/jobs")]
            assert len(job_creates) == 1
            assert len(cluster.live(JOBS)) == 1
            assert len({peer["priority"] for peer in peers_of(cluster).values()}) == 2, peers_of(cluster)


def peers_of(cluster: Cluster) -> dict:
    peering = cluster.get("kopf.dev/v1/kopfpeerings", PEERING) or {}
    return {identity: peer for identity, peer in (peering.get("status") or {}).items() if peer}
