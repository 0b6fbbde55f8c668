"""``python -m rmjob_operator`` start-up mistakes: outside a cluster, a kubeconfig that cannot be
used or an API server that does not answer ends the process with one ``error:`` line, no
traceback and a non-zero status, after a bounded wait; in a pod kopf's retrying is kept."""

from __future__ import annotations

import http.server
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import kopf
import pytest
import yaml

from rmjob_operator import __main__ as entry


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kubeconfig(server: str, **changes) -> str:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "dev"}}],
        "clusters": [{"name": "dev", "cluster": {"server": server}}],
        "users": [{"name": "dev", "user": {"token": "t0ken"}}],
    }
    config.update(changes)
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def api_server_rejecting_credentials() -> Iterator[str]:
    """An API server that answers every request but the public ``/version`` 401, as one does
    to an expired token or to none."""

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/version" else 401)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@dataclass
class Mistake:
    name: str
    setup: Callable[[Path, str], dict]  # (tmp_path, 401 server) -> env changes (None unsets)
    says: tuple[str, ...]  # the problem and what to do
    args: tuple[str, ...] = ()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


MISTAKES = [
    Mistake("kubeconfig_missing", lambda tmp, _: {"KUBECONFIG": str(tmp / "kubeconfig")},
            ("cannot read the kubeconfig", "No such file or directory", "point KUBECONFIG at a readable")),
    Mistake("kubeconfig_is_a_directory", lambda tmp, _: {"KUBECONFIG": str(tmp)},
            ("cannot read the kubeconfig", "Is a directory", "point KUBECONFIG at a readable")),
    Mistake("kubeconfig_not_yaml", lambda tmp, _: {"KUBECONFIG": write(tmp / "kc", "clusters: [\n")},
            ("is not valid YAML", "check the file KUBECONFIG points at")),
    Mistake("kubeconfig_not_a_mapping", lambda tmp, _: {"KUBECONFIG": write(tmp / "kc", "- a\n- b\n")},
            ("is not a usable kubeconfig", "check the file KUBECONFIG points at")),
    Mistake("no_current_context",
            lambda tmp, _: {"KUBECONFIG": write(tmp / "kc", kubeconfig("https://127.0.0.1:1",
                                                                  **{"current-context": None}))},
            ("sets no current-context", "kubectl config use-context")),
    Mistake("current_context_undefined",
            lambda tmp, _: {"KUBECONFIG": write(tmp / "kc", kubeconfig("https://127.0.0.1:1",
                                                                  **{"current-context": "prod"}))},
            ("refers to 'prod'", "does not define it", "kubectl config use-context")),
    Mistake("cluster_without_server",
            lambda tmp, _: {"KUBECONFIG": write(tmp / "kc", kubeconfig("", clusters=[{"name": "dev", "cluster": {}}]))},
            ("the current context's cluster has no server", "fix the cluster entry")),
    Mistake("missing_certificate_authority",
            lambda tmp, _: {"KUBECONFIG": write(tmp / "kc", kubeconfig("https://127.0.0.1:1", clusters=[
                {"name": "dev", "cluster": {"server": "https://127.0.0.1:1",
                                            "certificate-authority": str(tmp / "ca.crt")}}]))},
            ("has unusable TLS settings", "certificate-authority")),
    Mistake("no_credentials_at_all", lambda tmp, _: {"KUBECONFIG": None, "HOME": str(tmp)},
            ("no Kubernetes credentials", "set KUBECONFIG")),
    Mistake("api_server_unreachable",
            lambda tmp, _: {"KUBECONFIG": write(tmp / "kc", kubeconfig(f"https://127.0.0.1:{closed_port()}"))},
            ("cannot reach the Kubernetes API server https://127.0.0.1:", "within 2 s",
             "check that the cluster is running"), args=("--startup-timeout", "2")),
    Mistake("credentials_rejected", lambda tmp, server: {"KUBECONFIG": write(tmp / "kc", kubeconfig(server))},
            ("rejected the kubeconfig's credentials (401 Unauthorized)", "log in again")),
    Mistake("user_without_credentials",
            lambda tmp, server: {"KUBECONFIG": write(tmp / "kc", kubeconfig(server, users=[{"name": "dev", "user": {}}]))},
            ("rejected the kubeconfig's credentials (401 Unauthorized)", "fix the user in")),
    Mistake("exec_credential_plugin",
            lambda tmp, server: {"KUBECONFIG": write(tmp / "kc", kubeconfig(server, users=[{"name": "dev", "user": {
                "exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "aws",
                         "args": ["eks", "get-token", "--cluster-name", "prod"]}}}]))},
            ("user 'dev' gets its credentials from an exec plugin `aws`, which the operator cannot run",
             "kubectl create token", "run the operator in the cluster")),
    Mistake("auth_provider_without_token",
            lambda tmp, server: {"KUBECONFIG": write(tmp / "kc", kubeconfig(server, users=[{"name": "dev", "user": {
                "auth-provider": {"name": "oidc", "config": {"idp-issuer-url": "https://idp.example.com"}}}}]))},
            ("user 'dev' gets its credentials from an auth-provider 'oidc', which the operator cannot run",)),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_startup_mistake_is_one_line_and_a_nonzero_exit(mistake: Mistake, tmp_path: Path,
                                                        api_server_rejecting_credentials: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in mistake.setup(tmp_path, api_server_rejecting_credentials).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rmjob_operator", *mistake.args], capture_output=True,
                            text=True, env=env, timeout=60)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and result.stdout == "" and result.stderr.count("\n") == 1, output
    assert result.stderr.startswith("error: "), output
    for fragment in mistake.says:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert elapsed < 30  # bounded: the unreachable server's 2 s, plus interpreter start


def test_unreachable_api_server_is_retried_until_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", write(tmp_path / "kc", kubeconfig(f"http://127.0.0.1:{closed_port()}")))
    started = time.monotonic()
    with pytest.raises(entry.StartupError, match="within 1.5 s"):
        entry.check_cluster_access(timeout=1.5)
    assert 1.5 <= time.monotonic() - started < 5


def test_a_reachable_cluster_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any answer but 401 means the server is there (kopf reports what it cannot list itself)."""

    class Version(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.headers["Authorization"] == "Bearer t0ken" else 500)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Version)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KUBECONFIG", write(tmp_path / "kc", kubeconfig(f"http://127.0.0.1:{server.server_port}")))
        entry.check_cluster_access(timeout=5)
    finally:
        server.shutdown()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """main() installs kopf's log handler on the root logger; keep it out of other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_in_cluster_the_operator_starts_and_kopf_keeps_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's service account, no KUBECONFIG: no start-up wait, whatever the API server does."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    unreachable = kopf.ConnectionInfo(server=f"https://127.0.0.1:{closed_port()}", token="sa-token")
    monkeypatch.setattr(kopf, "login_with_service_account", lambda **_: unreachable)
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda **_: pytest.fail("kubeconfig read in a pod"))
    runs = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: runs.append(kwargs))
    started = time.monotonic()
    entry.main([])
    assert len(runs) == 1 and time.monotonic() - started < 5
