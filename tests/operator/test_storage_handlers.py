"""spec.storage in the handlers (KMock + real kopf): the created claim is adopted unless it is
retained, a retained claim of an earlier job of that name is mounted again, and an existing
claim several nodes cannot share fails the job with InvalidSpec."""

from __future__ import annotations

import asyncio

from kmock_cluster import JOBS, NAMESPACE, Cluster, api, condition, new_job, phase_is, rmj, rmj_path, wait_for

from rmjob_operator import render

PVCS = "v1/persistentvolumeclaims"
CLAIM_PATH = f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims"


async def test_created_claim_is_owned_by_the_job(cluster: Cluster, operator: asyncio.Task) -> None:
    await api(cluster, "post", rmj_path(), new_job(storage={"size": "1Gi"}))
    claim = await wait_for(lambda: cluster.get(PVCS, "rm-test-output"), message="the claim")
    assert [ref["uid"] for ref in claim["metadata"]["ownerReferences"]] == [rmj(cluster)["metadata"]["uid"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # new_job has two nodes


async def test_retained_claim_is_not_owned_and_is_mounted_again_by_a_job_of_that_name(
        cluster: Cluster, operator: asyncio.Task) -> None:
    job = new_job(storage={"size": "1Gi", "retainOnDelete": True})
    earlier = next(c for c in render.render_children(job, "job") if c["kind"] == "PersistentVolumeClaim")
    await api(cluster, "post", CLAIM_PATH, earlier)  # what a deleted job of this name left
    await api(cluster, "post", rmj_path(), job)
    await wait_for(lambda: (rmj(cluster).get("status") or {}).get("workload"), message="the workload recorded")
    assert cluster.get(JOBS, "rm-test") is not None
    assert not cluster.get(PVCS, "rm-test-output")["metadata"].get("ownerReferences")
    assert condition(rmj(cluster), "Created")["reason"] == "WorkloadCreated"


async def test_a_claim_of_that_name_that_is_not_retained_is_someone_elses(
        cluster: Cluster, operator: asyncio.Task) -> None:
    job = new_job(storage={"size": "1Gi", "retainOnDelete": True})
    foreign = next(c for c in render.render_children(job, "job") if c["kind"] == "PersistentVolumeClaim")
    del foreign["metadata"]["annotations"]
    await api(cluster, "post", CLAIM_PATH, foreign)
    await api(cluster, "post", rmj_path(), job)
    await wait_for(phase_is(cluster, "Failed"))
    assert condition(rmj(cluster), "Created")["reason"] == "ChildNameTaken"
    assert cluster.get(JOBS, "rm-test") is None


async def test_existing_claim_several_nodes_cannot_share_fails_the_job(
        cluster: Cluster, operator: asyncio.Task) -> None:
    await api(cluster, "post", CLAIM_PATH, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "team", "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    await api(cluster, "post", rmj_path(), new_job(storage={"existingClaim": "team"}))
    await wait_for(phase_is(cluster, "Failed"))
    status = rmj(cluster)["status"]
    assert condition(rmj(cluster), "InvalidSpec")["status"] == "True"
    assert status["message"].startswith("spec.storage.existingClaim: PersistentVolumeClaim team is ReadWriteOnce")
    assert cluster.get(JOBS, "rm-test") is None


async def test_existing_read_write_many_claim_or_none_yet_starts_the_job(
        cluster: Cluster, operator: asyncio.Task) -> None:
    await api(cluster, "post", CLAIM_PATH, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "team", "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    await api(cluster, "post", rmj_path(), new_job(storage={"existingClaim": "team"}))
    await api(cluster, "post", rmj_path(), new_job("rm-later", storage={"existingClaim": "not-yet"}))
    await wait_for(lambda: cluster.get(JOBS, "rm-test") and cluster.get(JOBS, "rm-later"), message="both workloads")
