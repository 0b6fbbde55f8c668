"""The operator as a real process against the local control plane, with the identity the
chart gives it (issue 8); used by the fixtures in conftest.py and by the tests. A module of its
own: test modules cannot import from conftest reliably (every test directory has one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".tools" / "bin" / "helm"
CHART = REPO / "charts" / "rmjob-operator"
CRD_MANIFEST = REPO / "manifests" / "crd.yaml"


def helm_template(release: str, namespace: str, *set_values: str, chart: Path = CHART) -> list[dict]:
    """The chart rendered by the real helm (`--set` for each of ``set_values``), as objects."""
    args = [str(HELM), "template", release, str(chart), "--namespace", namespace]
    for value in set_values:
        args += ["--set", value]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"helm template failed: {result.stderr.strip()}", pytrace=False)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


class OperatorIdentity:
    """A ServiceAccount holding exactly what `helm template charts/rmjob-operator` grants the
    operator (``set_values`` as for helm), with a TokenRequest token in ``kubeconfig``."""

    def __init__(self, cluster, kubectl, workdir: Path, *set_values: str, namespace: str | None = None):
        self.release = f"rmjob-{uuid.uuid4().hex[:8]}"
        # The chart's own namespace: where its ServiceAccount (and, namespaced, its Roles) live.
        self.namespace = namespace or self.release
        self._kubectl = kubectl
        self._own_namespace = namespace is None
        if self._own_namespace:
            kubectl("create", "namespace", self.namespace)
        docs = helm_template(self.release, self.namespace, *set_values)
        # Identity and permissions only: no Deployment (the test runs the process), and no
        # admission policy, which would bind cluster-wide in a cluster other tests share.
        self.objects = [d for d in docs if d["kind"] in (
            "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "KopfPeering")]
        kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": self.objects}))
        account = next(d for d in self.objects if d["kind"] == "ServiceAccount")["metadata"]["name"]
        self.username = f"system:serviceaccount:{self.namespace}:{account}"
        token = kubectl("create", "token", account, "-n", self.namespace, "--duration=4h").stdout.strip()
        self.token = token
        self.kubeconfig = workdir / f"{self.release}.kubeconfig"
        cluster.token_kubeconfig(self.kubeconfig, user=account, token=token)

    def delete(self) -> None:
        for obj in self.objects:
            if obj["kind"].startswith("Cluster"):
                self._kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--wait=false", check=False)
        if self._own_namespace:
            self._kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)


class OperatorProcess:
    """`python -m rmjob_operator` as a process of its own; its log in ``log_path``."""

    def __init__(self, kubeconfig: Path, namespaces: list[str], log_path: Path, *extra_args: str):
        self.args = [sys.executable, "-m", "rmjob_operator", "--log-format=plain",
                     *(f"--namespace={ns}" for ns in namespaces), *extra_args]
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies or the OOM killer strikes."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> int | None:
        """SIGTERM (a pod's termination), then SIGKILL after 10 s; the exit code."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode if self.process else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def new_namespace(kubectl, *labels: str) -> str:
    """A namespace (with ``key=value`` labels) whose default ServiceAccount exists."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kubectl("create", "namespace", name)
    if labels:
        kubectl("label", "namespace", name, *labels)
    # Pods need the namespace's default ServiceAccount, which a controller creates.
    kubectl("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=60s")
    return name


# --- fixtures a test module takes in the scope it needs: ``ns = namespace_fixture("module")`` ---

def namespace_fixture(scope: str = "function"):
    """The fixture below, one namespace for each test or, with scope="module", for each module."""

    @pytest.fixture(scope=scope)
    def fresh_namespace(kubectl):
        """A fresh namespace (new_namespace), deleted afterwards without waiting for it to go."""
        name = new_namespace(kubectl)
        yield name
        kubectl("delete", "namespace", name, "--wait=false", check=False)

    return fresh_namespace


def operator_fixture(scope: str = "function"):
    """The fixture below, one operator for each test or, with scope="module", for each module."""

    @pytest.fixture(scope=scope)
    def operator(cluster, kubectl, rmj_crd, ns, start_operator, tmp_path_factory):
        """The operator process watching the ``ns`` fixture's namespace alone, as the identity
        the chart gives it there (watchNamespaces); it must exit 0 when stopped, and its
        identity is deleted with it."""
        identity = OperatorIdentity(cluster, kubectl, tmp_path_factory.mktemp("identity"), f"watchNamespaces={{{ns}}}")
        process = start_operator([ns], identity=identity)
        yield process
        assert process.stop() == 0, process.log()[-3000:]
        identity.delete()

    return operator
