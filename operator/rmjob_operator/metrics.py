"""The operator's Prometheus metrics (``--metrics-address HOST:PORT`` serves them at /metrics).

- ``rmjob_operator_reconciliations_total{handler, outcome}``: every handler run, by how it
  ended: ``success``, ``retry`` (kopf.TemporaryError, retried later), ``permanent_error``
  (kopf.PermanentError) or ``error`` (any other exception; kopf retries it);
- ``rmjob_operator_handler_duration_seconds{handler}``: how long each run took;
- ``rmjob_operator_jobs{phase}``: the RewardModelJobs this operator watches, by ``status.phase``
  (``Unknown`` before the first status write); every phase is exported, 0 included, so a
  phase that empties drops to 0 instead of vanishing.

The job gauge is computed at scrape time from what the watch last said about each job, and a
deleted job leaves it with its DELETED event. The standby replica of a peering pair does not
watch: its gauge keeps the values from when it last was active.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kopf
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from rmjob_operator.spec import PHASES

UNKNOWN_PHASE = "Unknown"

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
    """Each watched job's last known phase, by uid; a Prometheus collector of their counts."""

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()  # the scrape runs in the HTTP server's thread

    def observe(self, uid: str, phase: str | None) -> None:
        with self._lock:
            self._phases[uid] = phase or UNKNOWN_PHASE

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            phases = list(self._phases.values())
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


def serve(address: str) -> None:
    """Serve /metrics on ``address`` from a thread of its own; OSError if it cannot bind."""
    host, port = parse_address(address)
    start_http_server(port, addr=host)
