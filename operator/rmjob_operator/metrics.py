"""The operator's Prometheus metrics (``--metrics-address HOST:PORT`` serves them at /metrics).

- ``rmjob_operator_reconciliations_total{handler, outcome}``: every handler run, by how it
  ended: ``success``, ``retry`` (kopf.TemporaryError, retried later), ``permanent_error``
  (kopf.PermanentError) or ``error`` (any other exception; kopf retries it);
- ``rmjob_operator_handler_duration_seconds{handler}``: how long each run took;
- ``rmjob_operator_jobs{phase}``: the RewardModelJobs this operator watches, by ``status.phase``
  (``Unknown`` before the first status write); every phase is exported, 0 included, so a
  phase that empties drops to 0 instead of vanishing.

The job gauge is computed at scrape time from what the watch last said about each job, and a
deleted job leaves it with its DELETED event. A job deleted while no watch was open (a standby
replica of a peering pair, whose watches kopf closes; the gap of a watch restart) sends no
DELETED event, and the listing that follows cannot say what is gone: while /metrics is served,
the namespaces holding jobs are listed every :data:`PRUNE_INTERVAL_S` seconds and the jobs no
longer there leave the gauge. A standby replica's phases keep the values from when it last
was active.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kopf
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from rmjob_operator import GROUP, PLURAL, VERSION
from rmjob_operator.kube import KubeApi
from rmjob_operator.spec import PHASES

UNKNOWN_PHASE = "Unknown"
# One LIST per namespace that holds jobs, this often: the delay before a job deleted unseen
# leaves the gauge.
PRUNE_INTERVAL_S = 30.0
logger = logging.getLogger(__name__)

RECONCILIATIONS = Counter(
    "rmjob_operator_reconciliations", "Handler runs, by handler and outcome.", ["handler", "outcome"])
HANDLER_DURATION = Histogram(
    "rmjob_operator_handler_duration_seconds", "Handler run time, by handler.", ["handler"],
    # Status patches take milliseconds; a create handler's child objects and retries up to ~30 s.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "success"
    if isinstance(error, kopf.TemporaryError):
        return "retry"
    if isinstance(error, kopf.PermanentError):
        return "permanent_error"
    return "error"


def instrumented(handler: str) -> Callable[[Callable], Callable]:
    """Counts and times every run of the decorated kopf handler (async or sync) as ``handler``.

    Goes below the kopf decorators: kopf keeps the wrapper, whose name and signature are the
    handler's (functools.wraps), so handler ids in kopf's progress records do not change. A
    cancelled run (the operator stopping) is not an outcome and is not counted.
    """

    def decorate(fn: Callable) -> Callable:
        def record(started: float, error: BaseException | None) -> None:
            HANDLER_DURATION.labels(handler).observe(time.perf_counter() - started)
            RECONCILIATIONS.labels(handler, _outcome(error)).inc()

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    result = await fn(*args, **kwargs)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    record(started, error)
                    raise
                record(started, None)
                return result

            return run_async

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except Exception as error:
                record(started, error)
                raise
            record(started, None)
            return result

        return run

    return decorate


class JobPhases:
    """Each watched job's namespace and last known phase, by uid; a Prometheus collector of
    their counts."""

    def __init__(self) -> None:
        # uid -> (namespace, phase, the observation's number: prune spares what it did not list)
        self._jobs: dict[str, tuple[str, str, int]] = {}
        self._observations = 0
        self._lock = threading.Lock()  # the scrape runs in the HTTP server's thread

    def observe(self, uid: str, namespace: str, phase: str | None) -> None:
        with self._lock:
            self._observations += 1
            self._jobs[uid] = (namespace, phase or UNKNOWN_PHASE, self._observations)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._jobs.pop(uid, None)

    def namespaces(self) -> set[str]:
        with self._lock:
            return {namespace for namespace, _, _ in self._jobs.values()}

    def mark(self) -> int:
        """Call before listing; pass the result to :meth:`prune` with what the listing found."""
        with self._lock:
            return self._observations

    def prune(self, namespace: str, listed_uids: set[str], mark: int) -> None:
        """Forget the jobs of ``namespace`` that a listing begun at ``mark`` did not find, except
        those observed since (created after the listing)."""
        with self._lock:
            self._jobs = {uid: job for uid, job in self._jobs.items()
                          if job[0] != namespace or uid in listed_uids or job[2] > mark}

    async def keep_pruned(self, kube: KubeApi, interval: float = PRUNE_INTERVAL_S) -> None:
        """Runs until cancelled: every ``interval`` seconds, prunes each namespace holding jobs."""
        while True:
            await asyncio.sleep(interval)
            for namespace in sorted(self.namespaces()):
                mark = self.mark()
                try:
                    listing = await kube.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}")
                except Exception as error:  # the next round tries again; the gauge waits meanwhile
                    logger.warning("cannot list the jobs of %s for the jobs gauge: %s", namespace, error)
                    continue
                listed = {item["metadata"]["uid"] for item in (listing or {}).get("items", [])}
                self.prune(namespace, listed, mark)

    def counts(self) -> dict[str, int]:
        with self._lock:
            phases = [phase for _, phase, _ in self._jobs.values()]
        return {phase: phases.count(phase) for phase in (*PHASES, UNKNOWN_PHASE)}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("rmjob_operator_jobs", "RewardModelJobs watched, by status.phase.",
                                  labels=["phase"])
        for phase, count in self.counts().items():
            gauge.add_metric([phase], count)
        yield gauge


JOB_PHASES = JobPhases()
REGISTRY.register(JOB_PHASES)


class MetricsAddressError(ValueError):
    pass


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9090`` for IPv6) -> (host, port); MetricsAddressError says what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MetricsAddressError(f"--metrics-address must be HOST:PORT with a port in 1-65535 "
                                  f"(e.g. 0.0.0.0:9090), got {address!r}")
    return host, int(port)


SERVING = threading.Event()  # set once /metrics is served: the gauge is pruned only then


def serve(address: str) -> None:
    """Serve /metrics on ``address`` from a thread of its own; OSError if it cannot bind."""
    host, port = parse_address(address)
    start_http_server(port, addr=host)
    SERVING.set()
