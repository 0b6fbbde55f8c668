"""The operator's RBAC is derived from what it does: run the real operator against an in-memory
API server (the operator tests' KMock harness), record every request it makes, and compare
them with the chart's rules — nothing it calls is missing, nothing granted goes unused.
"""

from __future__ import annotations

import re
import sys

import kmock
import pytest

from conftest import REPO, by_kind

sys.path.insert(0, str(REPO / "tests" / "operator"))
from kmock_cluster import (  # noqa: E402
    JOBS, NAMESPACE, OUR_CRD, PYTORCHJOB_CRD, PYTORCHJOBS, Cluster, crash_after_workload_created, emulated_cluster,
    new_job, phase_is, rmj, rmj_path, running_operator, wait_for,
)

CRDS = (OUR_CRD, PYTORCHJOB_CRD)
TEST_CLIENT = {"X-Rmjob-Test-Client": "1"}  # marks the requests this test makes itself
# Granted but not observable against KMock: CRD watching is off in the harness (kopf's
# scanning), and the finalizers grant is checked by an admission plugin, not an API call.
NOT_OBSERVABLE = {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                  ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
                  ("rmjob.dev", "rewardmodeljobs/finalizers", "update")}
PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                  r"(?:/namespaces/[^/]+)?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")


class RecordingCluster(Cluster):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: set[tuple[str, str, str]] = set()

    async def _handle(self, request: kmock.Request):
        if "X-Rmjob-Test-Client" not in request.headers:
            self.calls.update(rbac_call(request.method.value, request.url.path, request.params))
        return await super()._handle(request)


def rbac_call(method: str, path: str, params) -> list[tuple[str, str, str]]:
    """``(apiGroup, resource[/subresource], verb)`` of one request; [] for API discovery."""
    match = PATH.match(path)
    if match is None or (match["core"] is None and match["plural"] in ("v1",)):
        return []
    if method == "GET":
        verb = "watch" if params.get("watch") in ("true", "1") else ("get" if match["name"] else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    resource = f"{match['plural']}/{match['sub']}" if match["sub"] else match["plural"]
    return [(match["group"] or "", resource, verb)]


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


async def client(cluster: Cluster, method: str, path: str, body: dict) -> None:
    headers = {**TEST_CLIENT, **({"Content-Type": "application/merge-patch+json"} if method == "patch" else {})}
    async with cluster.request(method, path, json=body, headers=headers) as resp:
        assert resp.status < 400, await resp.text()


def workload_status_path(plural: str, group_version: str, name: str) -> str:
    return f"/apis/{group_version}/namespaces/{NAMESPACE}/{plural}/{name}/status"


async def exercise(cluster: RecordingCluster) -> None:
    """Every handler: create (both backends), workload progress, a trainer report, a safe and a
    refused spec edit, an invalid spec."""
    # Storage: a claim the operator creates, and an existing one whose access modes it reads.
    for name, backend, resource, group_version, storage in (
            ("rm-job", "job", JOBS, "batch/v1", {"size": "1Gi"}),
            ("rm-ptj", "pytorchjob", PYTORCHJOBS, "kubeflow.org/v1", {"existingClaim": "team-outputs"})):
        await client(cluster, "post", rmj_path(), new_job(name, runPolicy={"backend": backend}, storage=storage))
        await wait_for(lambda: cluster.get(resource, name), message=f"{backend} workload")
        plural = resource.split("/")[-1]
        running = ({"active": 2, "ready": 2} if backend == "job"
                   else {"conditions": [{"type": "Running", "status": "True", "reason": "Running", "message": ""}]})
        await client(cluster, "patch", workload_status_path(plural, group_version, name), {"status": running})
        await wait_for(phase_is(cluster, "Running", name))
        await client(cluster, "patch", rmj_path(name) + "/status",
                     {"status": {"training": {"step": 3, "totalSteps": 9}}})  # as the trainer would
        await wait_for(lambda: (rmj(cluster, name).get("status") or {}).get("metrics"))
        await client(cluster, "patch", rmj_path(name), {"spec": {"runPolicy": {"suspend": True}}})
        await wait_for(lambda: rmj(cluster, name)["status"].get("observedGeneration") == 2)
        await client(cluster, "patch", rmj_path(name), {"spec": {"trainer": {"learningRate": 1e-4}}})
        await wait_for(lambda: any(c["type"] == "SpecChangeRefused" for c in rmj(cluster, name)["status"]["conditions"]))
    bad = new_job("rm-bad")
    bad["spec"]["trainer"]["learningRate"] = -1.0
    await client(cluster, "post", rmj_path(), bad)
    await wait_for(phase_is(cluster, "Failed", "rm-bad"))


@pytest.mark.timeout(60)
async def test_operator_rbac_is_exactly_what_it_calls(helm_template, monkeypatch, tmp_path) -> None:
    calls: set[tuple[str, str, str]] = set()
    async with emulated_cluster(RecordingCluster, monkeypatch, tmp_path, crds=CRDS) as cluster:
        async with running_operator():
            await exercise(cluster)
        calls |= cluster.calls
    # A fresh cluster: KMock keeps a crashed operator's watch streams open, blocking later writes.
    async with emulated_cluster(RecordingCluster, monkeypatch, tmp_path, crds=CRDS) as cluster:
        # An operator that dies after creating the children but before recording the workload:
        # its successor finds every child existing (409) and reads each back to check the owner.
        await crash_after_workload_created(
            lambda: client(cluster, "post", rmj_path(), new_job("rm-restart", runPolicy={"backend": "job"})))
        async with running_operator():
            await wait_for(lambda: (rmj(cluster, "rm-restart").get("status") or {}).get("workload"))
        calls |= cluster.calls

    (role,) = by_kind(helm_template(), "ClusterRole")
    rules = granted(role["rules"])
    assert calls - rules == set(), "calls the chart does not grant"
    assert rules - calls - NOT_OBSERVABLE == set(), "grants the operator never uses"
