"""`make bench-operator`: the operator's latency and scale against the real local control plane.

    python bench/operator_bench.py [--sequential 50] [--burst 1000] [--out bench/results]

The control plane is hack/cluster/cluster.py's (attached like a test session: started if needed,
stopped at the end unless someone else uses it or a person started it); KWOK nodes run the pods
and complete them, so a job goes Pending -> Running -> Succeeded without training anything.
The operator runs as ``python -m rmjob_operator --namespace NS``, a process of its own, as the
identity `helm template charts/rmjob-operator --set watchNamespaces={NS}` gives it (the way
tests/cluster/operator_harness.py starts it), watching one fresh namespace.

Measured:

(a) ``--sequential`` jobs, one at a time on the otherwise idle cluster (the next is created once
    the previous one is Succeeded): from the create request to the workload (the Job) appearing,
    and to the RewardModelJob's ``status.phase`` Succeeded; p50/p99. Times are taken in this
    process, from watch events as the API server streams them, so they are what a user watching
    would see (the API server's timestamps have a one-second resolution).
(b) ``--burst`` jobs created at once (``--create-workers`` concurrent requests): time until every
    one has its workload and until every one is Succeeded, errors (failed creates, jobs that
    end Failed or get no workload, ERROR lines in the operator's log), the operator's peak RSS
    and CPU seconds, and API requests per job.

API requests are counted by the API server itself: FlowSchemas matching only the operator's
ServiceAccount (one per kind of request, each assigning the priority level the operator gets
anyway, that of the built-in ``service-accounts`` schema) make the server's
``apiserver_flowcontrol_dispatched_requests_total`` count the operator's requests by kind, with
no proxy in between to slow it down. ``apiserver_request_total`` summed over everything (KWOK,
the controllers, this script) is reported beside it as the whole cluster's load.

Writes ``<out>/operator-<timestamp>.json`` and a markdown block for docs/benchmarks.md
(``.md``, also printed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench_cli import OneLineParser

REPO = Path(__file__).resolve().parents[1]
KUBECTL = REPO / ".tools" / "bin" / "kubectl"
# The operator process and the chart's identity, exactly as the cluster tests set them up; the
# control plane's module by its own name, as tests/cluster/conftest.py imports it.
sys.path.insert(0, str(REPO / "tests" / "cluster"))
sys.path.insert(0, str(REPO / "hack" / "cluster"))
import cluster as local_cluster  # noqa: E402

RMJ_PATH = "/apis/rmjob.dev/v1alpha1"
JOBS_PATH = "/apis/batch/v1"
# A job whose pods KWOK runs and completes: one CPU node, the Job backend (no Kubeflow here).
SPEC = {
    "trainer": {"modelNameOrPath": "EleutherAI/pythia-14m",
                "datasetMixer": {"trl-internal-testing/sentiment-trl-style": 1.0}},
    "resources": {"gpusPerNode": 0},
    "runPolicy": {"backend": "job"},
}
# What the operator's requests are counted as, first match wins (FlowSchema precedence order):
# (name, verbs, apiGroups, resources); the last catches everything else, discovery included.
REQUEST_KINDS = (
    ("job-status-writes", ["patch", "update"], ["rmjob.dev"], ["rewardmodeljobs", "rewardmodeljobs/status"]),
    ("job-reads", ["get", "list", "watch"], ["rmjob.dev"], ["rewardmodeljobs", "rewardmodeljobs/status"]),
    ("child-creates", ["create"], ["", "batch", "rbac.authorization.k8s.io", "kubeflow.org"],
     ["configmaps", "services", "serviceaccounts", "roles", "rolebindings", "jobs", "pytorchjobs"]),
    ("workload-reads", ["get", "list", "watch"], ["batch", "kubeflow.org"], ["jobs", "pytorchjobs"]),
    ("events", ["*"], ["", "events.k8s.io"], ["events"]),
    ("other", ["*"], ["*"], ["*"]),
)
FLOW_SCHEMA_PRECEDENCE = 1000  # after the built-in system schemas, before service-accounts (9000)
DISPATCHED = "apiserver_flowcontrol_dispatched_requests_total"
REJECTED = "apiserver_flowcontrol_rejected_requests_total"
CLUSTER_REQUESTS = "apiserver_request_total"
# The operator runs with kopf's full log format, "[time] logger [LEVEL   ] message", so that
# errors (a handler that raised, which kopf retries a minute later) can be told from the rest.
LOG_FORMAT = "--log-format=full"
LOG_ERROR = re.compile(r"\[(ERROR|CRITICAL)\s*\]")
LOG_WARNING = re.compile(r"\[WARNING\s*\]")


class BenchError(Exception):
    """What went wrong, in one line (printed as ``error: ...``)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequential", type=int, default=50, help="jobs of part (a), one at a time (default 50)")
    p.add_argument("--burst", type=int, default=1000, help="jobs of part (b), created at once (default 1000)")
    p.add_argument("--create-workers", type=int, default=16,
                   help="concurrent create requests in part (b) (default 16)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds part (b) may take until every job is Succeeded (default 900)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON and .md go")
    args = p.parse_args(argv)
    for flag, value, least in (("--sequential", args.sequential, 1), ("--burst", args.burst, 1),
                               ("--create-workers", args.create_workers, 1), ("--timeout", args.timeout, 1)):
        if value < least:
            p.error(f"{flag} {value}: must be at least {least}")
    return args


def make_kubectl(kubeconfig: Path):
    """kubectl as tests/cluster's fixture calls it (operator_harness uses this signature)."""

    def run(*args: str, input: str | None = None, kubeconfig: Path = kubeconfig, check: bool = True):
        result = subprocess.run([str(KUBECTL), *args], input=input, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "KUBECONFIG": str(kubeconfig)})
        if check and result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BenchError(f"kubectl {' '.join(args[:3])}: {last}")
        return result

    return run


# --- the API server, as admin --------------------------------------------------------------
class Api:
    """Admin requests to the local API server; one connection per thread (kept alive)."""

    def __init__(self, cluster) -> None:
        self.host, self.port = cluster.server.removeprefix("https://").rsplit(":", 1)
        self.context = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
        self.context.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
        self._local = threading.local()

    def connect(self, timeout: float | None = 60) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, int(self.port), context=self.context, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        for attempt in range(2):  # a kept-alive connection the server closed meanwhile: once more
            conn = getattr(self._local, "conn", None) or self.connect()
            self._local.conn = conn
            try:
                conn.request(method, path, body=None if body is None else json.dumps(body),
                             headers={"Content-Type": "application/json", "Accept": "application/json"})
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: dict | None = None, ok: tuple[int, ...] = (200, 201)) -> dict:
        status, data = self.request(method, path, body)
        if status not in ok:
            message = json.loads(data or b"{}").get("message", data[:200].decode(errors="replace"))
            raise BenchError(f"{method} {path}: HTTP {status}: {message}")
        return json.loads(data or b"{}")

    def metrics(self) -> dict[str, dict[tuple, float]]:
        """The API server's Prometheus metrics this script reads: name -> {labels: value}."""
        status, data = self.request("GET", "/metrics")
        if status != 200:
            raise BenchError(f"GET /metrics: HTTP {status}")
        wanted = (DISPATCHED, REJECTED, CLUSTER_REQUESTS)
        found: dict[str, dict[tuple, float]] = {name: {} for name in wanted}
        for line in data.decode().splitlines():
            name, _, rest = line.partition("{")
            if name in found:
                labels, _, value = rest.rpartition("} ")
                found[name][tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
        return found


class Watch(threading.Thread):
    """One watch stream (list, then watch from its resourceVersion; re-opened if the server
    ends it); ``handle(event_type, object, t)`` gets each event with its arrival time."""

    def __init__(self, api: Api, path: str, handle) -> None:
        super().__init__(daemon=True)
        self.api, self.path, self.handle = api, path, handle
        self.resource_version = api.json("GET", path)["metadata"]["resourceVersion"]
        self.stopped = threading.Event()
        self.conn: http.client.HTTPSConnection | None = None
        self.error: str | None = None

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.conn = self.api.connect(timeout=None)
                self.conn.request("GET", f"{self.path}?watch=1&allowWatchBookmarks=true&timeoutSeconds=3600"
                                         f"&resourceVersion={self.resource_version}")
                response = self.conn.getresponse()
                if response.status != 200:
                    self.error = f"watch {self.path}: HTTP {response.status}"
                    return
                for line in iter(response.readline, b""):
                    now = time.monotonic()
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        self.error = f"watch {self.path}: {event['object'].get('message')}"
                        return
                    self.resource_version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self.handle(event["type"], event["object"], now)
            except (http.client.HTTPException, OSError, ValueError) as error:
                if not self.stopped.is_set():
                    self.error = f"watch {self.path}: {error}"
                    return
            finally:
                self.conn.close()

    def stop(self) -> None:
        self.stopped.set()
        if self.conn and self.conn.sock:
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)  # ends the blocking read
            except OSError:
                pass  # closed already


class Timeline:
    """When each job's workload appeared and its phase became Succeeded/Failed (monotonic s)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.workload: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.failed: dict[str, str] = {}

    def on_job(self, kind: str, obj: dict, now: float) -> None:
        with self.changed:
            self.workload.setdefault(obj["metadata"]["name"], now)
            self.changed.notify_all()

    def on_rmj(self, kind: str, obj: dict, now: float) -> None:
        status, name = obj.get("status") or {}, obj["metadata"]["name"]
        with self.changed:
            if status.get("phase") == "Succeeded":
                self.succeeded.setdefault(name, now)
            elif status.get("phase") == "Failed":
                self.failed.setdefault(name, status.get("message", ""))
            self.changed.notify_all()

    def wait(self, done, timeout: float, watches: list[Watch]) -> bool:
        """Until ``done()`` (called under the lock) or the timeout; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not done():
                broken = [w.error for w in watches if w.error]
                if broken:
                    raise BenchError(broken[0])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 1.0))
        return True


# --- the operator process -------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Sets the process's peak RSS back to its current RSS (Linux >= 4.0); False where refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def flow_schemas(prefix: str, service_account: tuple[str, str], priority_level: str) -> list[dict]:
    namespace, name = service_account
    subject = {"kind": "ServiceAccount", "serviceAccount": {"namespace": namespace, "name": name}}
    schemas = []
    for index, (kind, verbs, groups, resources) in enumerate(REQUEST_KINDS):
        rule = {"subjects": [subject], "resourceRules": [
            {"verbs": verbs, "apiGroups": groups, "resources": resources, "namespaces": ["*"], "clusterScope": True}]}
        if kind == "other":
            rule["nonResourceRules"] = [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
        schemas.append({
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
            "metadata": {"name": f"{prefix}-{kind}"},
            "spec": {"matchingPrecedence": FLOW_SCHEMA_PRECEDENCE + index,
                     "priorityLevelConfiguration": {"name": priority_level},
                     "distinguisherMethod": {"type": "ByUser"}, "rules": [rule]},
        })
    return schemas


def request_counts(metrics: dict, prefix: str) -> dict[str, float]:
    """The operator's requests by kind (dispatched), its rejected ones, and the cluster's total."""
    counts = {kind: 0.0 for kind, *_ in REQUEST_KINDS}
    counts["rejected"] = 0.0
    for labels, value in metrics[DISPATCHED].items():
        schema = dict(labels).get("flow_schema", "")
        if schema.startswith(prefix + "-"):
            counts[schema.removeprefix(prefix + "-")] += value
    for labels, value in metrics[REJECTED].items():
        if dict(labels).get("flow_schema", "").startswith(prefix + "-"):
            counts["rejected"] += value
    counts["cluster_total"] = sum(metrics[CLUSTER_REQUESTS].values())
    return counts


def difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after}


def per_job(requests: dict[str, float], jobs: int) -> dict:
    operator = {kind: requests[kind] / jobs for kind, *_ in REQUEST_KINDS}
    return {"operator_total": sum(operator.values()), "operator_by_kind": operator,
            "operator_rejected": requests["rejected"] / jobs, "cluster_total": requests["cluster_total"] / jobs}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 samples is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))]


def component_cpu(cluster) -> dict[str, float]:
    """CPU seconds so far of each control-plane component (their pids from cluster.py's state)."""
    state = cluster.state() or {}
    result = {}
    for name, entry in state.get("pids", {}).items():
        pid = entry if isinstance(entry, int) else entry["pid"]
        try:
            result[name] = cpu_seconds(pid)
        except OSError:
            pass
    return result


class Bench:
    def __init__(self, args: argparse.Namespace, cluster, api: Api, namespace: str, operator, prefix: str):
        self.args, self.cluster, self.api, self.ns = args, cluster, api, namespace
        self.operator, self.prefix = operator, prefix
        self.timeline = Timeline()
        self.watches = [Watch(api, f"{JOBS_PATH}/namespaces/{namespace}/jobs", self.timeline.on_job),
                        Watch(api, f"{RMJ_PATH}/namespaces/{namespace}/rewardmodeljobs", self.timeline.on_rmj)]
        for watch in self.watches:
            watch.start()

    def stop(self) -> None:
        for watch in self.watches:
            watch.stop()

    def body(self, name: str) -> dict:
        return {"apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob",
                "metadata": {"name": name, "namespace": self.ns}, "spec": SPEC}

    def create(self, name: str) -> str | None:
        """None, or why the API server refused it."""
        try:
            status, data = self.api.request("POST", f"{RMJ_PATH}/namespaces/{self.ns}/rewardmodeljobs", self.body(name))
        except (http.client.HTTPException, OSError) as error:
            return f"{name}: {error}"
        return None if status == 201 else f"{name}: HTTP {status}: {json.loads(data or b'{}').get('message')}"

    def log_lines(self) -> list[str]:
        return self.operator.log().splitlines()

    def wait_succeeded(self, name: str, timeout: float) -> None:
        timeline = self.timeline
        if not timeline.wait(lambda: name in timeline.succeeded or name in timeline.failed, timeout, self.watches):
            raise BenchError(f"{name} not Succeeded after {timeout:.0f} s; operator log tail: "
                             f"{' | '.join(self.log_lines()[-3:])}")
        if name in timeline.failed:
            raise BenchError(f"{name} Failed: {timeline.failed[name]}")

    def warm_up(self) -> None:
        """The operator's start (kopf's discovery and first watches) is not what (a) measures."""
        if error := self.create("warm-up"):
            raise BenchError(f"create {error}")
        self.wait_succeeded("warm-up", 240)

    def sequential(self) -> dict:
        before = request_counts(self.api.metrics(), self.prefix)
        samples = []
        for index in range(self.args.sequential):
            name = f"seq-{index:04d}"
            start = time.monotonic()
            if error := self.create(name):
                raise BenchError(f"create {error}")
            created = time.monotonic()
            self.wait_succeeded(name, 120)
            samples.append({"name": name, "create_request_s": created - start,
                            "workload_s": self.timeline.workload[name] - start,
                            "succeeded_s": self.timeline.succeeded[name] - start})
            time.sleep(0.5)  # late status writes of this job settle: the next one starts on an idle cluster
        requests = difference(request_counts(self.api.metrics(), self.prefix), before)
        summary = {}
        for key in ("create_request_s", "workload_s", "succeeded_s"):
            values = [s[key] for s in samples]
            summary[key] = {"p50": percentile(values, 50), "p99": percentile(values, 99),
                            "mean": statistics.fmean(values), "max": max(values)}
        return {"jobs": len(samples), "summary": summary, "requests_per_job": per_job(requests, len(samples)),
                "samples": samples}

    def burst(self) -> dict:
        names = [f"burst-{index:04d}" for index in range(self.args.burst)]
        pid = self.operator.process.pid
        log_start = len(self.log_lines())
        peak_reset = reset_peak_rss(pid)
        rss_before = peak_rss_mib(pid)
        cpu_before, components_before = cpu_seconds(pid), component_cpu(self.cluster)
        requests_before = request_counts(self.api.metrics(), self.prefix)
        load_before = os.getloadavg()

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(self.args.create_workers) as pool:
            create_errors = [e for e in pool.map(self.create, names) if e]
        created_s = time.monotonic() - start
        timeline, wanted = self.timeline, set(names)
        deadline = start + self.args.timeout
        all_workloads = timeline.wait(lambda: wanted <= timeline.workload.keys() | timeline.failed.keys(),
                                      deadline - time.monotonic(), self.watches)
        workloads_s = time.monotonic() - start if all_workloads else None
        all_done = timeline.wait(lambda: wanted <= timeline.succeeded.keys() | timeline.failed.keys(),
                                 deadline - time.monotonic(), self.watches)
        succeeded_s = time.monotonic() - start if all_done else None
        time.sleep(2)  # the last status writes and events, counted with the burst
        requests = difference(request_counts(self.api.metrics(), self.prefix), requests_before)
        operator_cpu = cpu_seconds(pid) - cpu_before
        components = difference(component_cpu(self.cluster), components_before)

        new_log = self.log_lines()[log_start:]
        error_lines = [line for line in new_log if LOG_ERROR.search(line)]
        with timeline.changed:
            no_workload = sorted(wanted - timeline.workload.keys())
            failed = {name: timeline.failed[name] for name in names if name in timeline.failed}
            not_succeeded = sorted(wanted - timeline.succeeded.keys())
            last_workload = max((timeline.workload[n] for n in names if n in timeline.workload), default=start)
        errors = len(create_errors) + len(failed) + len(no_workload) + len(error_lines)
        return {
            "jobs": len(names), "create_workers": self.args.create_workers,
            "create_s": created_s,
            "all_workloads_s": workloads_s, "last_workload_s": last_workload - start,
            "all_succeeded_s": succeeded_s,
            "errors": errors,
            "error_detail": {"create_failed": create_errors[:5], "create_failed_count": len(create_errors),
                             "failed": dict(list(failed.items())[:5]), "failed_count": len(failed),
                             "without_workload": no_workload[:5], "without_workload_count": len(no_workload),
                             "operator_error_lines": error_lines[:5], "operator_error_line_count": len(error_lines)},
            "not_succeeded_count": len(not_succeeded),
            "operator_warning_lines": sum(1 for line in new_log if LOG_WARNING.search(line)),
            "operator_peak_rss_mib": peak_rss_mib(pid),
            "operator_rss_at_start_mib": rss_before,
            "peak_rss_since": "burst start" if peak_reset else "operator start (clear_refs refused)",
            "operator_cpu_s": operator_cpu,
            "control_plane_cpu_s": components,
            "requests_per_job": per_job(requests, len(names)),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        }


def operator_source() -> dict:
    """The commit measured, and the operator files that differ from it (a shared working tree)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "operator", "charts").splitlines()
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": [line[3:] for line in changed]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "")
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def markdown(result: dict) -> str:
    seq, burst = result["sequential"], result["burst"]
    cs, ws, ss = (seq["summary"][key] for key in ("create_request_s", "workload_s", "succeeded_s"))

    def seconds(value: float | None) -> str:
        return "not reached" if value is None else f"{value:.2f} s"

    def load(values) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    by_kind = burst["requests_per_job"]["operator_by_kind"]
    kinds = ", ".join(f"{kind} {value:.1f}" for kind, value in by_kind.items() if value)
    plane = ", ".join(f"{name} {value:.0f} s" for name, value in burst["control_plane_cpu_s"].items())
    source = result["operator_source"]
    lines = [
        f"Run {result['timestamp']} (`{result['command']}`) of commit {source['commit'][:10]}"
        + (f" with uncommitted changes to {', '.join(source['uncommitted'])}" if source["uncommitted"] else "")
        + f", {result['machine']['cpus']} cores "
        f"({result['machine']['cpu']}); load average (1/5/15 min) {load(result['loadavg_start'])} at the start, "
        f"{load(burst['loadavg_before'])} before (b), {load(burst['loadavg_after'])} after it.",
        "",
        f"(a) {seq['jobs']} jobs one at a time on the idle cluster:",
        "",
        "| from the create request to | p50 | p99 | mean | max |",
        "|---|---|---|---|---|",
        f"| the workload (Job) created | {ws['p50']:.3f} s | {ws['p99']:.3f} s | {ws['mean']:.3f} s | {ws['max']:.3f} s |",
        f"| `status.phase` Succeeded | {ss['p50']:.3f} s | {ss['p99']:.3f} s | {ss['mean']:.3f} s | {ss['max']:.3f} s |",
        f"| (the create request's answer) | {cs['p50']:.3f} s | {cs['p99']:.3f} s | {cs['mean']:.3f} s | {cs['max']:.3f} s |",
        "",
        f"Operator API requests per job: {seq['requests_per_job']['operator_total']:.1f}.",
        "",
        f"(b) {burst['jobs']} RewardModelJobs created at once ({burst['create_workers']} concurrent creates, "
        f"all accepted after {burst['create_s']:.1f} s):",
        "",
        "| | |",
        "|---|---|",
        f"| every job has its workload | {seconds(burst['all_workloads_s'])} after the first create |",
        f"| every job Succeeded | {seconds(burst['all_succeeded_s'])} |",
        f"| errors | **{burst['errors']}** (failed creates {burst['error_detail']['create_failed_count']}, "
        f"jobs Failed {burst['error_detail']['failed_count']}, without workload "
        f"{burst['error_detail']['without_workload_count']}, operator ERROR lines "
        f"{burst['error_detail']['operator_error_line_count']}: a handler that raised, retried by kopf a minute later) |",
        f"| operator warnings (retried writes) | {burst['operator_warning_lines']} log lines |",
        f"| operator peak RSS | {burst['operator_peak_rss_mib']:.0f} MiB (since {burst['peak_rss_since']}; "
        f"{burst['operator_rss_at_start_mib']:.0f} MiB before) |",
        f"| operator CPU | {burst['operator_cpu_s']:.1f} s ({1000 * burst['operator_cpu_s'] / burst['jobs']:.1f} ms per job) |",
        f"| operator API requests per job | {burst['requests_per_job']['operator_total']:.1f} ({kinds}); "
        f"rejected by flow control {burst['requests_per_job']['operator_rejected']:.2f} |",
        f"| all API requests per job (KWOK, controllers, scheduler, this script) | "
        f"{burst['requests_per_job']['cluster_total']:.1f} |",
        f"| control-plane CPU during (b) | {plane} |",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    from operator_harness import CRD_MANIFEST, OperatorIdentity, OperatorProcess
    from rmj import wait_established, wait_until

    cluster = local_cluster.Cluster()
    missing = [name for name in local_cluster.BINARIES if not os.access(cluster.bin / name, os.X_OK)]
    if missing or not os.access(KUBECTL, os.X_OK):
        raise BenchError(f"{', '.join(missing) or 'kubectl'} missing from .tools/bin: run make install (needs go)")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    load_start = os.getloadavg()
    cluster.attach()
    cleanup = []
    try:
        kubectl = make_kubectl(cluster.kubeconfig)
        api = Api(cluster)
        kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=rmjob-bench", "-f", str(CRD_MANIFEST))
        wait_established(kubectl, "rewardmodeljobs.rmjob.dev")
        # The API server builds a custom resource's storage on the first request for it and answers
        # 429 "storage is (re)initializing" until its cache is filled: on a fresh control plane that
        # was the watches' first list, which does not retry.
        wait_until(lambda: api.request("GET", f"{RMJ_PATH}/rewardmodeljobs?limit=1")[0] == 200, 60,
                   "rewardmodeljobs to be served")
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        kubectl("create", "namespace", namespace)
        cleanup.append(lambda: kubectl("delete", "namespace", namespace, "--wait=false", check=False))
        kubectl("wait", "--for=create", "serviceaccount/default", "-n", namespace, "--timeout=60s")
        work = Path(tempfile.mkdtemp(prefix="rmjob-operator-bench-"))
        cleanup.append(lambda: shutil.rmtree(work, ignore_errors=True))
        identity = OperatorIdentity(cluster, kubectl, work, f"watchNamespaces={{{namespace}}}")
        cleanup.append(identity.delete)
        _, _, sa_namespace, sa_name = identity.username.split(":")

        priority_level = api.json("GET", "/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas/service-accounts")[
            "spec"]["priorityLevelConfiguration"]["name"]
        prefix = f"rmjob-bench-{uuid.uuid4().hex[:6]}"
        for schema in flow_schemas(prefix, (sa_namespace, sa_name), priority_level):
            api.json("POST", "/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas", schema)
            cleanup.append(lambda name=schema["metadata"]["name"]: api.request(
                "DELETE", f"/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas/{name}"))

        # The harness passes --log-format=plain first; the later flag wins.
        operator = OperatorProcess(identity.kubeconfig, [namespace], work / "operator.log", LOG_FORMAT).start()
        cleanup.append(operator.stop)
        bench = Bench(args, cluster, api, namespace, operator, prefix)
        cleanup.append(bench.stop)
        bench.warm_up()
        print(f"(a) {args.sequential} jobs one at a time", flush=True)
        sequential = bench.sequential()
        print(f"(b) {args.burst} jobs at once", flush=True)
        burst = bench.burst()
        if operator.process.poll() is not None:
            raise BenchError(f"the operator exited with {operator.process.returncode}; log tail: "
                             f"{' | '.join(operator.log().splitlines()[-3:])}")
        return {"timestamp": stamp, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": machine(), "operator_source": operator_source(), "loadavg_start": load_start,
                "operator_log": operator.log(), "settings": {
                    "sequential": args.sequential, "burst": args.burst, "create_workers": args.create_workers,
                    "timeout": args.timeout, "operator": operator.args[1:], "flow_control_priority_level": priority_level},
                "sequential": sequential, "burst": burst}
    finally:
        for step in reversed(cleanup):
            try:
                step()
            except Exception as error:  # cleanup goes on; the run's own error matters more
                print(f"warning: cleanup: {error}", file=sys.stderr)
        cluster.detach()


def main(argv: list[str] | None = None) -> int:
    import pytest

    args = parse_args(argv)
    try:
        result = run(args)
    # operator_harness's helm_template reports through pytest.fail (outside Exception's tree), and
    # rmj's waits (a CRD not established, rewardmodeljobs not served) through AssertionError
    except (BenchError, local_cluster.ClusterError, pytest.fail.Exception, AssertionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"operator-{result['timestamp']}"
    Path(f"{stem}.operator.log").write_text(result.pop("operator_log"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    block = markdown(result)
    stem.with_suffix(".md").write_text(block)
    print(block)
    print(f"wrote {stem}.json, .md and .operator.log")
    return 0 if result["burst"]["errors"] == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
