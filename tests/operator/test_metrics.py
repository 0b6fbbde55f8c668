"""The operator's Prometheus metrics (rmjob_operator/metrics.py): outcomes, latency, the
jobs-by-phase gauge, and the --metrics-address flag."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import kopf
import pytest
from prometheus_client import REGISTRY

from rmjob_operator import __main__ as entry
from rmjob_operator import metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_async_handler_outcomes_are_counted_and_timed():
    @metrics.instrumented("t_async")
    async def handler(outcome: BaseException | None = None, **_):
        if outcome:
            raise outcome

    await handler()
    for error in (kopf.TemporaryError("later"), kopf.PermanentError("never"), RuntimeError("bug")):
        with pytest.raises(type(error)):
            await handler(outcome=error)
    counted = {outcome: sample("rmjob_operator_reconciliations_total", handler="t_async", outcome=outcome)
               for outcome in ("success", "retry", "permanent_error", "error")}
    assert counted == {"success": 1, "retry": 1, "permanent_error": 1, "error": 1}
    assert sample("rmjob_operator_handler_duration_seconds_count", handler="t_async") == 4
    assert handler.__name__ == "handler"  # kopf's handler id stays the function's


def test_sync_handlers_stay_sync():
    @metrics.instrumented("t_sync")
    def handler(**_):
        return "done"

    assert handler() == "done"  # not a coroutine: kopf runs sync handlers in a thread
    assert sample("rmjob_operator_reconciliations_total", handler="t_sync", outcome="success") == 1


def test_job_gauge_follows_phases_and_deletions():
    phases = metrics.JobPhases()
    phases.observe("a", "ns", None)
    phases.observe("b", "ns", "Running")
    phases.observe("c", "ns", "Running")
    phases.observe("a", "ns", "Running")  # the same job, moved on: counted once
    phases.observe("b", "ns", "Succeeded")
    phases.forget("c")
    phases.forget("unknown")  # a job deleted before it was seen: nothing to do
    [family] = phases.collect()
    values = {s.labels["phase"]: s.value for s in family.samples}
    assert values == {"Pending": 0, "Running": 1, "Succeeded": 1, "Failed": 0, "Suspended": 0, "Unknown": 0}


@pytest.mark.parametrize("address", ["9090", "localhost", ":9090", "127.0.0.1:", "127.0.0.1:70000", "a:b"])
def test_bad_metrics_address_is_one_line(address, capsys):
    with pytest.raises(SystemExit) as exited:
        entry.main(["--metrics-address", address])
    assert exited.value.code == entry.EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --metrics-address must be HOST:PORT"), err


def test_metrics_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit):
            entry.main(["--metrics-address", f"127.0.0.1:{taken.getsockname()[1]}"])
    err = capsys.readouterr().err
    assert err.startswith("error: cannot serve metrics on 127.0.0.1:") and err.count("\n") == 1, err


def test_served_on_the_given_address():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(f"127.0.0.1:{port}")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "rmjob_operator_jobs{phase=\"Running\"}" in text


def test_prune_forgets_unlisted_jobs_of_the_namespace_only():
    phases = metrics.JobPhases()
    phases.observe("kept", "a", "Running")
    phases.observe("deleted-unseen", "a", "Running")
    phases.observe("elsewhere", "b", "Running")
    mark = phases.mark()
    phases.observe("created-while-listing", "a", "Pending")  # after the listing began: not in it
    phases.prune("a", {"kept"}, mark)
    assert phases.counts()["Running"] == 2 and phases.counts()["Pending"] == 1
    assert phases.namespaces() == {"a", "b"}


class ListingKube:
    """KubeApi's ``get`` for the job lists: the uids in ``listed`` by namespace; ``failing``
    namespaces answer with an error."""

    def __init__(self, listed: dict[str, list[str]], failing: set[str] = frozenset()):
        self.listed, self.failing, self.paths = listed, failing, []

    async def get(self, path: str) -> dict:
        self.paths.append(path)
        namespace = path.split("/")[5]
        if namespace in self.failing:
            raise OSError("connection refused")
        return {"items": [{"metadata": {"uid": uid}} for uid in self.listed.get(namespace, [])]}


async def test_keep_pruned_lists_each_namespace_holding_jobs():
    phases = metrics.JobPhases()
    for uid, namespace in (("gone", "a"), ("here", "a"), ("gone-too", "b"), ("unknown", "c")):
        phases.observe(uid, namespace, "Succeeded")
    kube = ListingKube({"a": ["here"], "b": []}, failing={"c"})
    pruner = asyncio.create_task(phases.keep_pruned(kube, interval=0.01))
    try:
        for _ in range(200):
            if len(kube.paths) >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        pruner.cancel()
    assert sorted(kube.paths[:3]) == [f"/apis/rmjob.dev/v1alpha1/namespaces/{ns}/rewardmodeljobs" for ns in "abc"]
    # c's listing failed: its job stays until a listing says otherwise.
    assert phases.counts()["Succeeded"] == 2 and phases.namespaces() == {"a", "c"}
