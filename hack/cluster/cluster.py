#!/usr/bin/env python3
"""A local Kubernetes control plane for tests and demos: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and KWOK's simulated nodes, all on 127.0.0.1.

The binaries come from ``.tools/bin`` (built by ``make install``, see hack/k8s/build.sh).
Standard library plus the ``openssl`` command only, so it runs before and without the
project's own packages::

    python hack/cluster/cluster.py up       # idempotent; prints the kubeconfig path
    python hack/cluster/cluster.py status
    python hack/cluster/cluster.py down     # stops everything, removes the state

State lives in ``.cluster/`` (``--dir``): ``kubeconfig`` (admin, system:masters), ``logs/``,
``pki/``, etcd's data and ``state.json`` (ports; each component's pid and process start time).
A marker file (``.rmjob-cluster``) identifies a state directory: a non-empty directory
without it is refused, and ``down`` removes only the entries cluster.py creates (OWN_ENTRIES).
A component counts as running when its recorded pid still has the recorded start time and
its command line names this state directory, so a recycled pid or another cluster's process
never does; ``down`` also stops this directory's components found by command line when
``state.json`` is gone. ``up`` restarts only components that died, with the same ports,
certificates and etcd data.

Tests share one cluster through :func:`attach` / :func:`detach`: the first user starts it,
the last one stops it unless a person started it with ``up``. Users are recorded by pid and
process start time; one that died without detaching (SIGKILL, OOM killer) counts as gone. A
session killed that way leaves its cluster running until the next session's ``detach`` (at
that session's end at the latest), which stops it when no live user remains.

Nodes: KWOK manages only the nodes annotated ``kwok.x-k8s.io/node=fake`` (``kwok-node-N``,
created here): pods bound to them become Running and, when a Job owns them, Succeeded
(hack/cluster/kwok-stages.yaml). Any other node is left to whoever registers it. A pod
runner registers its own node (e.g. ``runner-0``) with RUNNER_LABEL and RUNNER_TAINT, keeps it
Ready (condition heartbeat or Lease, else the node-lifecycle controller taints it), and
writes the status of the pods bound to it; a test sends its pods there by
annotating its namespace with RUNNER_NAMESPACE_ANNOTATIONS (a node selector and a toleration
added to every pod by admission), while other tests' pods stay off the tainted node.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / ".cluster"
DEFAULT_BIN = REPO / ".tools" / "bin"
KWOK_STAGES = Path(__file__).resolve().parent / "kwok-stages.yaml"
KUBERNETES_GO_MOD = REPO / "hack" / "k8s" / "kubernetes" / "go.mod"

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"
# KWOK manages only nodes carrying this annotation, so a node registered by anything else
# (the test pod runner's ``runner-0``) is left alone.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
DEFAULT_KWOK_NODES = 2
# A node that runs pods as local processes (the test pod runner) carries this label and taint;
# a namespace annotated with RUNNER_NAMESPACE_ANNOTATIONS gets its pods placed there and only
# there (admission plugins PodNodeSelector and PodTolerationRestriction).
RUNNER_LABEL = ("rmjob.dev/pod-runner", "true")
RUNNER_TAINT = {"key": "rmjob.dev/pod-runner", "value": "true", "effect": "NoSchedule"}
RUNNER_NAMESPACE_ANNOTATIONS = {
    "scheduler.alpha.kubernetes.io/node-selector": "=".join(RUNNER_LABEL),
    "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
        [{"key": RUNNER_TAINT["key"], "operator": "Equal", "value": RUNNER_TAINT["value"],
          "effect": RUNNER_TAINT["effect"]}]),
}
# Lean on purpose (two shared cores): what Jobs, RBAC, garbage collection and the chart's
# Deployment need. Names as `kube-controller-manager --help` lists them.
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",
    "ttl-after-finished-controller",
    "deployment-controller",
    "replicaset-controller",
    "endpointslice-controller",
    "pod-garbage-collector-controller",
    # Fills the built-in admin/edit/view ClusterRoles from their aggregated parts.
    "clusterrole-aggregation-controller",
    # Removes a deleted claim's kubernetes.io/pvc-protection finalizer once no pod uses it;
    # without it every namespace that held a claim stays Terminating for good.
    "persistentvolumeclaim-protection-controller",
    # Lifts the not-ready taint admission puts on every new node once the node reports Ready
    # (KWOK for its nodes, the pod runner for its own), and taints nodes that stop heartbeating.
    "node-lifecycle-controller",
)
# Start order; `down` stops them in reverse.
COMPONENT_PORTS = {
    "etcd": ("etcd", "etcd_peer"),
    "kube-apiserver": ("apiserver",),
    "kube-controller-manager": ("controller_manager",),
    "kube-scheduler": ("scheduler",),
    "kwok": ("kwok",),
}
MARKER = ".rmjob-cluster"
# What cluster.py (and pod runners, under pods/) write in a state directory: all `down` removes.
# The marker and the lock file stay, so the directory stays recognizable and lockable.
OWN_ENTRIES = ("state.json", "state.tmp", "kubeconfig", "kube-controller-manager.kubeconfig",
               "kube-scheduler.kubeconfig", "pki", "logs", "etcd", "users",
               "kube-controller-manager-certs", "kube-scheduler-certs", "pods")
STARTUP_TIMEOUT_S = 180.0
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")


class ClusterError(RuntimeError):
    """One line saying what is wrong; the CLI prints it as ``error: ...``."""


def pinned_kubernetes_version() -> str:
    """The k8s.io/kubernetes version hack/k8s/kubernetes/go.mod pins (what /version must say)."""
    for line in KUBERNETES_GO_MOD.read_text().splitlines():
        words = line.split("//")[0].split()
        if words[:1] == ["require"]:
            words = words[1:]
        if len(words) == 2 and words[0] == "k8s.io/kubernetes":
            return words[1]
    raise ClusterError(f"no `require k8s.io/kubernetes` line in {KUBERNETES_GO_MOD}")


@dataclass(frozen=True)
class Ports:
    apiserver: int
    etcd: int
    etcd_peer: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(*(base + offset for offset in range(6)))

    @classmethod
    def free(cls) -> Ports:
        """Free ports below the kernel's ephemeral range (all held open together so they differ).
        Outside it because a component restarted after dying must get its port back, and the
        kernel hands ports of that range to outgoing connections (then the port is busy)."""
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        candidates = random.sample(range(10000, ephemeral_low), k=min(200, max(ephemeral_low - 10000, 0)))
        with contextlib.ExitStack() as stack:
            ports = []
            for port in candidates:
                sock = stack.enter_context(socket.socket())
                with contextlib.suppress(OSError):
                    sock.bind(("127.0.0.1", port))
                    ports.append(port)
                if len(ports) == 6:
                    return cls(*ports)
        raise ClusterError(f"no 6 free ports on 127.0.0.1 between 10000 and {ephemeral_low} (below the "
                           "ephemeral range); pass --port-base")


def check_port_free(port: int, component: str) -> None:
    with socket.socket() as sock:
        # As the Go servers bind: connections of a component that just died (TIME_WAIT) do
        # not make its port taken, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except PermissionError:
            raise ClusterError(f"port {port} on 127.0.0.1 (for {component}) needs privileges; pick "
                               "a --port-base of 1024 or more") from None
        except OSError:
            raise ClusterError(
                f"port {port} on 127.0.0.1 (for {component}) is taken; pick another --port-base "
                "or leave it unset to use free ports"
            ) from None


class Cluster:
    """The control plane whose state lives in ``state_dir``."""

    def __init__(self, state_dir: Path = DEFAULT_DIR, bin_dir: Path = DEFAULT_BIN) -> None:
        self.dir = Path(state_dir).resolve()
        self.bin = Path(bin_dir).resolve()
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.kubeconfig = self.dir / "kubeconfig"
        self.state_file = self.dir / "state.json"
        self.users_dir = self.dir / "users"
        self._children: dict[str, subprocess.Popen] = {}  # started by this process: exit codes

    # ----------------------------------------------------------------- locking & state
    @contextlib.contextmanager
    def locked(self):
        """Serializes up/down/attach/detach across processes (pytest-xdist workers, make)."""
        self._claim_dir()
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _claim_dir(self) -> None:
        """Marks the state directory as cluster.py's, refusing one that holds anything else."""
        if (self.dir / MARKER).exists():
            return
        entries = set(os.listdir(self.dir)) if self.dir.is_dir() else set()
        # Made by cluster.py before the marker existed: only its own names, its state or lock among them.
        made_here = entries <= {*OWN_ENTRIES, ".lock"} and bool(entries & {"state.json", ".lock"})
        if entries and not made_here:
            raise ClusterError(f"{self.dir} is not empty and is no cluster state directory (no {MARKER} "
                               "in it); pass an empty or new --dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER).write_text("State directory of hack/cluster/cluster.py; `cluster.py down` "
                                       "removes only what cluster.py created here.\n")

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def _write_state(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def running(self) -> bool:
        """Every component runs and the API server answers /readyz."""
        state = self.state()
        if not state or self._dead(state):
            return False
        return self._get(f"https://127.0.0.1:{state['ports']['apiserver']}/readyz", timeout=5) == 200

    @property
    def server(self) -> str:
        state = self.state()
        if not state:
            raise ClusterError(f"no cluster in {self.dir} (run: make cluster-up)")
        return f"https://127.0.0.1:{state['ports']['apiserver']}"

    # ------------------------------------------------------------------------ lifecycle
    def up(self, *, nodes: int = DEFAULT_KWOK_NODES, port_base: int | None = None, owner: str = "manual") -> bool:
        """Starts the control plane, or the components of it that died (same ports, certificates
        and data); True when it started anything. Of a running one only ``owner`` may change: a
        person's ``up`` turns a test-started cluster into one the tests leave running."""
        _check_arguments(nodes, port_base)
        with self.locked():
            return self._up_locked(nodes=nodes, port_base=port_base, owner=owner)

    def _dead(self, state: dict) -> list[str]:
        return [name for name in BINARIES if not self._runs(name, state["pids"].get(name))]

    def _up_locked(self, *, nodes: int, port_base: int | None, owner: str) -> bool:
        state = self.state()
        if state is None:
            state = self._fresh_state(nodes=nodes, port_base=port_base, owner=owner)
        elif owner == "manual" and state["owner"] != "manual":
            state["owner"] = "manual"
            self._write_state(state)
        ports = Ports(**state["ports"])
        dead = self._dead(state)
        if not dead:
            # Running: a slow /readyz on a loaded machine is waited for, never a reason to
            # restart a cluster other processes are using.
            self._wait(state, "kube-apiserver",
                       lambda: self._get(f"https://127.0.0.1:{ports.apiserver}/readyz") == 200)
            return False
        self._check_binaries()
        for name in dead:
            for field in COMPONENT_PORTS[name]:
                # A component killed a moment ago may still hold its listener while it exits.
                for attempt in range(30):
                    try:
                        check_port_free(getattr(ports, field), field)
                        break
                    except ClusterError:
                        if attempt == 29:
                            raise
                        time.sleep(0.5)
            state["pids"].pop(name, None)  # else waiting for the others reports it as exited
        args = {"etcd": self._etcd_args, "kube-apiserver": self._apiserver_args,
                "kube-controller-manager": self._controller_manager_args,
                "kube-scheduler": self._scheduler_args, "kwok": self._kwok_args}

        def start_if_dead(name: str) -> None:
            if name in dead:
                self._start(state, name, args[name](ports))

        try:
            start_if_dead("etcd")
            self._wait(state, "etcd", lambda: self._get(f"http://127.0.0.1:{ports.etcd}/health", admin=False) == 200)
            start_if_dead("kube-apiserver")
            self._wait(state, "kube-apiserver",
                       lambda: self._get(f"https://127.0.0.1:{ports.apiserver}/readyz") == 200)
            for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
                start_if_dead(name)
            for name, port in (("kube-controller-manager", ports.controller_manager),
                               ("kube-scheduler", ports.scheduler)):
                self._wait(state, name, lambda port=port: self._get(f"https://127.0.0.1:{port}/healthz", admin=False) == 200)
            for index in range(state["nodes"]):
                self._create_kwok_node(f"kwok-node-{index}")
            self._wait(state, "kwok", lambda: self._nodes_ready(state["nodes"]))
            # Pods need the namespace's ServiceAccount and CA ConfigMap, written by controllers.
            self._wait(state, "kube-controller-manager", lambda: self._exists(
                "/api/v1/namespaces/default/serviceaccounts/default"))
            self._wait(state, "kube-controller-manager", lambda: self._exists(
                "/api/v1/namespaces/default/configmaps/kube-root-ca.crt"))
        except BaseException:
            self._stop(self._children_running())
            raise
        return True

    def _fresh_state(self, *, nodes: int, port_base: int | None, owner: str) -> dict:
        """Certificates, kubeconfigs and then state.json: a state.json means they are complete."""
        self._down_locked()  # whatever an interrupted start left
        self._check_binaries()
        ports = Ports.from_base(port_base) if port_base is not None else Ports.free()
        if port_base is not None:
            for component, port in vars(ports).items():
                check_port_free(port, component)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._make_pki()
        self._write_kubeconfigs(f"https://127.0.0.1:{ports.apiserver}")
        state = {"owner": owner, "ports": vars(ports), "pids": {}, "nodes": nodes,
                 "version": pinned_kubernetes_version()}
        self._write_state(state)
        return state

    def down(self) -> None:
        """Stops this directory's components (recorded or found by command line) and removes
        what cluster.py created; a directory that does not exist is left so."""
        if not self.dir.exists():
            self._stop(self._components_by_command_line())
            return
        with self.locked():
            self._down_locked()

    def _down_locked(self) -> None:
        self._stop({**self._components_by_command_line(), **self._children_running()})
        for name in OWN_ENTRIES:
            entry = self.dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()

    # Shared use by test sessions ------------------------------------------------------
    def attach(self, *, nodes: int = DEFAULT_KWOK_NODES) -> bool:
        """Registers this process as a user of the cluster, starting it (or its dead components)
        if needed; True when it started anything."""
        with self.locked():
            started = self._up_locked(nodes=nodes, port_base=None, owner="tests")
            self.users_dir.mkdir(exist_ok=True)
            self._live_users()  # forgets the dead ones
            (self.users_dir / str(os.getpid())).write_text(_process_start(os.getpid()) or "")
            return started

    def detach(self) -> bool:
        """Unregisters this process; the last live user of a test-started cluster stops it
        (True then). Users whose process died without detaching do not keep it alive."""
        with self.locked():
            with contextlib.suppress(FileNotFoundError):
                (self.users_dir / str(os.getpid())).unlink()
            state = self.state()
            if not state or state["owner"] != "tests" or self._live_users():
                return False
            self._down_locked()
            return True

    def _live_users(self) -> list[int]:
        """Pids of registered users still running (same pid and start time); forgets the rest."""
        live = []
        for entry in self.users_dir.iterdir() if self.users_dir.exists() else ():
            if entry.name.isdigit() and _process_start(int(entry.name)) == entry.read_text():
                live.append(int(entry.name))
            else:
                entry.unlink()
        return live

    # ---------------------------------------------------------------- component flags
    def _etcd_args(self, p: Ports) -> list[str]:
        return [
            "--name=rmjob", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p.etcd}",
            f"--advertise-client-urls=http://127.0.0.1:{p.etcd}",
            f"--listen-peer-urls=http://127.0.0.1:{p.etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p.etcd_peer}",
            f"--initial-cluster=rmjob=http://127.0.0.1:{p.etcd_peer}",
            # Throwaway data: fsync only slows the tests down (envtest does the same).
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self, p: Ports) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers=http://127.0.0.1:{p.etcd}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={p.apiserver}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # Per-namespace node selector and tolerations: how a test routes its pods to the
            # pod runner's node (see RUNNER_* below) while other tests keep using KWOK nodes.
            "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
            "--profiling=false",
        ]

    def _controller_manager_args(self, p: Ports) -> list[str]:
        kubeconfig = self.dir / "kube-controller-manager.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={p.controller_manager}",
            f"--cert-dir={self.dir / 'kube-controller-manager-certs'}",
            "--leader-elect=false",
            # Each controller acts under its own ServiceAccount, as in a real cluster.
            "--use-service-account-credentials=true",
            f"--controllers={','.join(CONTROLLERS)}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
        ]

    def _scheduler_args(self, p: Ports) -> list[str]:
        kubeconfig = self.dir / "kube-scheduler.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={p.scheduler}",
            f"--cert-dir={self.dir / 'kube-scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
        ]

    def _kwok_args(self, p: Ports) -> list[str]:
        key, value = KWOK_NODE_ANNOTATION
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{p.kwok}",
        ]

    # -------------------------------------------------------------------- certificates
    def _make_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        pki = self.pki
        # P-256 keys: RSA key generation takes seconds each on a busy 2-core machine.
        _openssl("req", "-x509", *EC_KEY, "-nodes", "-days", "365",
                 "-keyout", pki / "ca.key", "-out", pki / "ca.crt", "-subj", "/CN=rmjob-local-ca")
        self._signed_cert("apiserver", "/CN=kube-apiserver",
                          "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
                          "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
        # Client identities: CN is the user, O the group (x509 authenticator).
        self._signed_cert("admin", "/O=system:masters/CN=admin", "extendedKeyUsage=clientAuth")
        self._signed_cert("kube-controller-manager", "/CN=system:kube-controller-manager",
                          "extendedKeyUsage=clientAuth")
        self._signed_cert("kube-scheduler", "/CN=system:kube-scheduler", "extendedKeyUsage=clientAuth")
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", pki / "sa.key")
        _openssl("pkey", "-in", pki / "sa.key", "-pubout", "-out", pki / "sa.pub")

    def _signed_cert(self, name: str, subject: str, extension: str) -> None:
        pki = self.pki
        _openssl("req", *EC_KEY, "-nodes", "-keyout", pki / f"{name}.key",
                 "-out", pki / f"{name}.csr", "-subj", subject)
        _openssl("x509", "-req", "-in", pki / f"{name}.csr", "-CA", pki / "ca.crt", "-CAkey", pki / "ca.key",
                 "-CAcreateserial", "-days", "365", "-out", pki / f"{name}.crt",
                 "-extfile", "/dev/stdin", stdin=extension)
        (pki / f"{name}.csr").unlink()

    def client_kubeconfig(self, path: Path, *, user: str, cert: Path, key: Path) -> None:
        """Writes a kubeconfig for this cluster authenticating with a client cert/key pair."""
        self._kubeconfig(path, user, {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)})

    def token_kubeconfig(self, path: Path, *, user: str, token: str) -> None:
        """Writes a kubeconfig for this cluster authenticating with a bearer token."""
        self._kubeconfig(path, user, {"token": token})

    def _kubeconfig(self, path: Path, user: str, credentials: dict, server: str | None = None) -> None:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "rmjob-local", "cluster": {
                "server": server or self.server, "certificate-authority-data": _b64(self.pki / "ca.crt")}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "rmjob-local", "context": {"cluster": "rmjob-local", "user": user}}],
            "current-context": "rmjob-local",
        }, indent=2))
        path.chmod(0o600)

    def _write_kubeconfigs(self, server: str) -> None:
        for name in ("admin", "kube-controller-manager", "kube-scheduler"):
            path = self.kubeconfig if name == "admin" else self.dir / f"{name}.kubeconfig"
            self._kubeconfig(path, name, {"client-certificate-data": _b64(self.pki / f"{name}.crt"),
                                          "client-key-data": _b64(self.pki / f"{name}.key")}, server)

    # ---------------------------------------------------------------------- processes
    def _check_binaries(self) -> None:
        for name in BINARIES:
            if not os.access(self.bin / name, os.X_OK):
                raise ClusterError(f"{self.bin / name} is missing; build it with `make install` (needs Go)")

    def _start(self, state: dict, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")
        with log:
            # A session of its own: the cluster outlives the pytest worker that started it.
            process = subprocess.Popen([str(self.bin / name), *args], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                       start_new_session=True)
        self._children[name] = process
        # The fork's start time, which exec keeps: the pid's identity from now on.
        state["pids"][name] = {"pid": process.pid, "start": _process_start(process.pid)}
        self._write_state(state)

    def _wait(self, state: dict, name: str, ready) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            for component, entry in state["pids"].items():
                child = self._children.get(component)
                # For its own children this process asks the kernel for the exit status: right
                # after the start, /proc may still show the forked Python instead of the binary.
                exit_code = child.poll() if child and child.pid == entry["pid"] else None
                if exit_code is not None or (not child and not self._runs(component, entry)):
                    code = f" with code {exit_code}" if exit_code is not None else ""
                    raise ClusterError(f"{component} exited{code} during startup; see {self.logs / component}.log: "
                                       f"{_last_line(self.logs / f'{component}.log')}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready after {STARTUP_TIMEOUT_S:.0f}s; see {self.logs}/")
            time.sleep(0.25)

    def _runs(self, name: str, entry: dict | int | None) -> bool:
        """The state.json entry still is this directory's NAME: the same process (pid and start
        time) running that binary with this directory in its command line."""
        if entry is None:
            return False
        # A bare pid: state.json written before start times were recorded.
        pid, start = (entry, None) if isinstance(entry, int) else (entry["pid"], entry["start"])
        return (start is None or _process_start(pid) == start) and self._is_component(pid, name)

    def _identifying_arg(self, name: str) -> str:
        """The argument naming this state directory that NAME is always started with."""
        return {
            "etcd": f"--data-dir={self.dir / 'etcd'}",
            "kube-apiserver": f"--tls-cert-file={self.pki / 'apiserver.crt'}",
            "kube-controller-manager": f"--kubeconfig={self.dir / 'kube-controller-manager.kubeconfig'}",
            "kube-scheduler": f"--kubeconfig={self.dir / 'kube-scheduler.kubeconfig'}",
            "kwok": f"--kubeconfig={self.kubeconfig}",
        }[name]

    def _is_component(self, pid: int, name: str) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        return (Path(argv[0]).name == name and self._identifying_arg(name) in argv
                and _process_start(pid) is not None)  # a zombie has exited

    def _components_by_command_line(self) -> dict[int, str]:
        """pid -> process start of every running component of this directory."""
        found = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and any(self._is_component(int(proc.name), name) for name in BINARIES):
                if start := _process_start(int(proc.name)):
                    found[int(proc.name)] = start
        return found

    def _children_running(self) -> dict[int, str]:
        """This process's own children not yet exited (their /proc may not show the binary yet)."""
        return {child.pid: start for child in self._children.values()
                if child.poll() is None and (start := _process_start(child.pid))}

    def _stop(self, processes: dict[int, str]) -> None:
        """SIGTERM, then SIGKILL after 15 s, to each pid still having its recorded start time."""
        def alive(pid: int) -> bool:
            for child in self._children.values():
                if child.pid == pid:
                    child.poll()  # reaps it, so an exited child stops counting
            return _process_start(pid) == processes[pid]

        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for pid in processes:
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)

    # --------------------------------------------------------------------- API access
    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def _get(self, url: str, timeout: float = 2, *, admin: bool = True) -> int | None:
        """HTTP status of a GET (as admin, verifying the cluster CA), None when nothing answers."""
        if admin:
            context = self._ssl_context()
        else:  # controller-manager and scheduler serve /healthz with self-signed certs of their own
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (OSError, ssl.SSLError):
            return None

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """One admin request to the API server; raises ClusterError with its message on failure."""
        request = urllib.request.Request(
            self.server + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._ssl_context()) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}").get("message", error.reason)
            raise ClusterError(f"{method} {path}: HTTP {error.code}: {detail}") from None

    def _exists(self, path: str) -> bool:
        return self._get(self.server + path) == 200

    def _create_kwok_node(self, name: str) -> None:
        """Creates it unless it exists (a restarted cluster keeps its nodes in etcd)."""
        if self._exists(f"/api/v1/nodes/{name}"):
            return
        key, value = KWOK_NODE_ANNOTATION
        self.api("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                         "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                    "kubernetes.io/arch": "amd64", "type": "kwok"}},
        })

    def _nodes_ready(self, count: int) -> bool:
        """COUNT KWOK nodes report Ready and no longer carry a taint (so pods can land there)."""
        nodes = self.api("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"]
        ready = [n for n in nodes if not n["spec"].get("taints") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))]
        return len(ready) >= count


# ------------------------------------------------------------------------------ helpers
def _openssl(*args, stdin: str | None = None) -> None:
    if shutil.which("openssl") is None:
        raise ClusterError("openssl is not on PATH; it is needed to create the cluster's certificates")
    result = subprocess.run(["openssl", *map(str, args)], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {result.stderr.strip().splitlines()[-1]}")


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _process_start(pid: int) -> str | None:
    """Identifies the process PID across pid reuse: boot id and start time (/proc/PID/stat);
    None when no such process runs (a zombie has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return None
    # fields[0] is stat's 3rd field (state), so its 22nd (starttime) is fields[19].
    return None if fields[0] == "Z" else f"{boot} {fields[19]}"


def _check_arguments(nodes: int, port_base: int | None) -> None:
    if nodes < 0:
        raise ClusterError(f"--nodes {nodes}: the number of KWOK nodes cannot be negative")
    if port_base is not None and not 1 <= port_base <= 65535 - 5:
        raise ClusterError(f"--port-base {port_base}: the cluster uses ports BASE..BASE+5, so BASE "
                           "must be between 1 and 65530")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default .cluster/)")
    parser.add_argument("--bin", type=Path, default=DEFAULT_BIN, help="where the binaries are (default .tools/bin/)")
    parser.add_argument("--nodes", type=int, default=DEFAULT_KWOK_NODES, help="KWOK nodes kwok-node-0..N-1")
    parser.add_argument("--port-base", type=int, default=None,
                        help="use ports BASE..BASE+5 (apiserver first) instead of free ones")
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir, args.bin)
    try:
        if args.command == "up":
            cluster.up(nodes=args.nodes, port_base=args.port_base)
            print(f"cluster up: {cluster.server}; export KUBECONFIG={cluster.kubeconfig}")
        elif args.command == "down":
            cluster.down()
            print("cluster down")
        else:
            if not cluster.running():
                print("cluster not running")
                return 1
            print(f"cluster running: {cluster.server}; KUBECONFIG={cluster.kubeconfig}")
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
