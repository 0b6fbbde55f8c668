"""1,000 RewardModelJobs created and deleted against the real control plane, with the operator
as a process of its own: its resident memory returns to within 10% of what it was before them
(issue 9: per-job state must go with the job). The baseline is taken after a warm-up batch, so
that what any first batch allocates for good (imports, kopf's watchers, connection pools,
Python's allocator arenas) is not counted as a leak."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from operator_harness import namespace_fixture, operator_fixture
from rmj import cpu_spec, rmj, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.scale]

JOBS = 1000
WARM_UP_JOBS = 1000
TOLERANCE = 0.10
CREATORS = 4  # kubectl processes creating at once
# Suspended: the Job controller creates no pods, and the operator still does all of its work
# (children, status, the workload watch and its deletion events).
SPEC = cpu_spec(runPolicy={"suspend": True})


ns = namespace_fixture()
operator = operator_fixture()


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def names_with(kubectl, ns: str, *args: str) -> list[str]:
    return kubectl("get", *args, "-n", ns, "-o", "name").stdout.split()


def run_batch(kubectl, ns: str, prefix: str, count: int) -> None:
    """Create ``count`` jobs, wait until the operator has started each, delete them all and
    wait until the garbage collector has removed every workload (the operator then has their
    deletion events)."""
    names = [f"{prefix}-{i}" for i in range(count)]

    def create(chunk: list[str]) -> None:
        kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": [rmj(name, ns, SPEC) for name in chunk]}))

    with ThreadPoolExecutor(CREATORS) as pool:
        list(pool.map(create, [names[i::CREATORS] for i in range(CREATORS)]))
    started = '{range .items[?(@.status.workload)]}{.metadata.name}{"\\n"}{end}'
    wait_until(lambda: len(kubectl("get", "rewardmodeljobs.rmjob.dev", "-n", ns, "-o",
                                   f"jsonpath={started}").stdout.split()) == count,
               900, f"the operator to start {count} jobs", interval=5)
    kubectl("delete", "rewardmodeljobs.rmjob.dev", "--all", "-n", ns, "--wait=false")
    # The operator watches the jobs and their workloads, not the other children.
    wait_until(lambda: not names_with(kubectl, ns, "rewardmodeljobs.rmjob.dev,jobs"),
               900, "every job and workload gone", interval=5)


def settled_rss(pid: int) -> int:
    """RSS once the operator is idle: kopf's per-object workers exit a few seconds after an
    object's last event."""
    time.sleep(15)
    return rss_bytes(pid)


@pytest.mark.timeout(3600)  # two batches of ~10 minutes each on a loaded two-core machine
def test_the_operators_memory_returns_after_1000_jobs_are_created_and_deleted(kubectl, ns, operator):
    pid = operator.process.pid
    started = settled_rss(pid)
    run_batch(kubectl, ns, "warm", WARM_UP_JOBS)
    baseline = settled_rss(pid)
    run_batch(kubectl, ns, "rm", JOBS)
    after = settled_rss(pid)
    print(f"operator RSS: {started / 2**20:.1f} MiB idle at start, {baseline / 2**20:.1f} MiB after "
          f"{WARM_UP_JOBS} warm-up jobs, {after / 2**20:.1f} MiB after {JOBS} more "
          f"({(after - baseline) / baseline:+.1%})")
    assert after <= baseline * (1 + TOLERANCE), (baseline, after)
    assert operator.process.poll() is None, operator.log()[-3000:]
