"""The operator's /metrics (issue 9, item 7), scraped from a real operator process while it
reconciles jobs on the real control plane (pods on KWOK's simulated nodes): the counters move,
the handler latency histogram fills, and the jobs-by-phase gauge follows a job to Succeeded
and back to zero when the job is deleted."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rmj import cpu_spec, rmj, wait_for_phase, wait_until

pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def jobs_by_phase(samples: dict) -> dict[str, float]:
    return {dict(labels)["phase"]: v for (name, labels), v in samples.items() if name == "rmjob_operator_jobs"}


@pytest.mark.timeout(240)
def test_metrics_move_while_the_operator_reconciles(kubectl, namespace, rmj_crd, start_operator):
    port = free_port()
    operator = start_operator([namespace], f"--metrics-address=127.0.0.1:{port}")
    before = wait_until(lambda: _scrape_or_none(port), 60, "the operator's /metrics")
    assert value(before, "rmjob_operator_reconciliations_total", handler="reconcile", outcome="success") == 0
    assert set(jobs_by_phase(before).values()) == {0}

    kubectl("apply", "-f", "-", input=json.dumps(rmj("rm-metrics", namespace, cpu_spec())))
    wait_for_phase(kubectl, namespace, "rm-metrics", "Succeeded", operator=operator)

    def settled():
        samples = scrape(port)
        return samples if jobs_by_phase(samples).get("Succeeded") == 1 else None

    during = wait_until(settled, 60, "the Succeeded job in rmjob_operator_jobs")
    assert value(during, "rmjob_operator_reconciliations_total", handler="reconcile", outcome="success") >= 1
    assert value(during, "rmjob_operator_reconciliations_total", handler="workload_changed", outcome="success") >= 2
    assert value(during, "rmjob_operator_handler_duration_seconds_count", handler="reconcile") >= 1
    assert value(during, "rmjob_operator_handler_duration_seconds_sum", handler="reconcile") > 0
    assert jobs_by_phase(during) == {"Pending": 0, "Running": 0, "Succeeded": 1, "Failed": 0, "Suspended": 0,
                                     "Unknown": 0}

    kubectl("delete", "rmj", "rm-metrics", "-n", namespace)
    def emptied():
        samples = scrape(port)
        return samples if set(jobs_by_phase(samples).values()) == {0} else None

    after = wait_until(emptied, 60, "rmjob_operator_jobs back to 0 after the delete")
    assert value(after, "rmjob_operator_reconciliations_total", handler="reconcile", outcome="success") == \
        value(during, "rmjob_operator_reconciliations_total", handler="reconcile", outcome="success")


def _scrape_or_none(port: int) -> dict | None:
    try:
        return scrape(port)
    except OSError:
        return None
