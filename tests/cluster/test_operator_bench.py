"""`make bench-operator` (bench/operator_bench.py) at a small size against the local control
plane, so its plumbing stays tested: watches, the operator process, the API server's request
counts, the report. No speed assertions (those belong to the benchmark)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "operator_bench.py"
sys.path.append(str(BENCH.parent))  # the bench scripts are scripts, not a package


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_operator_bench_small_run(cluster, tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--sequential", "3", "--burst", "20", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=590)
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = tmp_path.glob("operator-*.json")
    result = json.loads(result_file.read_text())

    sequential, burst = result["sequential"], result["burst"]
    assert sequential["jobs"] == len(sequential["samples"]) == 3
    for sample in sequential["samples"]:
        assert 0 < sample["create_request_s"] < sample["workload_s"] < sample["succeeded_s"], sample
    assert burst["jobs"] == 20 and burst["errors"] == 0, burst["error_detail"]
    assert burst["not_succeeded_count"] == 0
    assert 0 < burst["last_workload_s"] <= burst["all_workloads_s"] < burst["all_succeeded_s"]
    assert burst["operator_peak_rss_mib"] > 0 and burst["operator_cpu_s"] > 0
    assert burst["peak_rss_since"] == "burst start"

    # The API server counted the operator's requests by kind: a create for every child render.py
    # gives such a job, none counted twice (a create retried after a timeout under load may add
    # a few), and reads and status writes for each job.
    import operator_bench
    from rmjob_operator import render

    body = {"apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob",
            "metadata": {"name": "x", "namespace": "n", "uid": "u"}, "spec": operator_bench.SPEC}
    children = len(render.render_children(body, "job", None))
    for part in (sequential, burst):
        per_job = part["requests_per_job"]
        assert children <= per_job["operator_by_kind"]["child-creates"] < children + 1, per_job
        assert per_job["operator_by_kind"]["job-status-writes"] >= 1 and per_job["operator_by_kind"]["job-reads"] >= 1
        assert per_job["cluster_total"] > per_job["operator_total"]

    report = result_file.with_suffix(".md").read_text()
    assert f"| the workload (Job) created | {sequential['summary']['workload_s']['p50']:.3f} s |" in report
    assert "(b) 20 RewardModelJobs created at once" in report and "| errors | **0**" in report
    assert f"Operator API requests per job: {sequential['requests_per_job']['operator_total']:.1f}." in report
    assert f"| operator API requests per job | {burst['requests_per_job']['operator_total']:.1f} (" in report
    # Each line of the operator's log carries its level: how errors are told from the rest.
    log = Path(f"{result_file.with_suffix('')}.operator.log").read_text()
    assert re.search(r"\[INFO\s*\] .*Handler 'reconcile' succeeded", log), log[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--burst", "0"], "error: --burst 0: must be at least 1"),
    (["--sequential", "-1"], "error: --sequential -1: must be at least 1"),
    (["--burts", "5"], "error: unrecognized arguments: --burts 5"),
])
def test_bad_arguments_are_one_line(args, message):
    run = subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [message]


def test_a_wait_that_times_out_is_one_line(monkeypatch, capsys, tmp_path):
    """rmj's waits (the CRD established, rewardmodeljobs served) fail with AssertionError."""
    import operator_bench

    def timed_out(args):
        raise AssertionError("timed out after 60s waiting for rewardmodeljobs to be served")

    monkeypatch.setattr(operator_bench, "run", timed_out)
    assert operator_bench.main(["--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: timed out after 60s waiting for rewardmodeljobs to be served"]
    assert not list(tmp_path.iterdir())
