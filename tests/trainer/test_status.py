"""StatusReporter: environment detection, the patch it sends, throttling, and never raising."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from rmjob_trainer.status import StatusReporter


class Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str, dict]] = []
    authorizations: list[str | None] = []
    status_code = 200

    def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.requests.append((self.command, self.path, self.headers["Content-Type"], body))
        Recorder.authorizations.append(self.headers.get("Authorization"))
        self.send_response(Recorder.status_code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    Recorder.requests, Recorder.authorizations, Recorder.status_code = [], [], 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch, api_server: str) -> str:
    monkeypatch.setenv("RMJOB_JOB_NAME", "rm-1")
    monkeypatch.setenv("RMJOB_NAMESPACE", "team-a")
    monkeypatch.setenv("RMJOB_KUBE_API", api_server)
    return api_server


def test_off_outside_an_operator_launched_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RMJOB_JOB_NAME", raising=False)
    monkeypatch.setenv("RMJOB_NAMESPACE", "team-a")
    assert StatusReporter.from_env() is None


def test_off_without_a_reachable_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMJOB_JOB_NAME", "rm-1")
    monkeypatch.setenv("RMJOB_NAMESPACE", "team-a")
    monkeypatch.delenv("RMJOB_KUBE_API", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert StatusReporter.from_env() is None


def test_merge_patches_status_training_on_the_status_subresource(job_env: str) -> None:
    reporter = StatusReporter.from_env()
    assert reporter.report({"step": 3, "trainLoss": 0.5})
    ((method, path, content_type, body),) = Recorder.requests
    assert (method, path) == ("PATCH", "/apis/rmjob.dev/v1alpha1/namespaces/team-a/rewardmodeljobs/rm-1/status")
    assert content_type == "application/merge-patch+json"
    training = body["status"]["training"]
    assert training["step"] == 3 and training["trainLoss"] == 0.5 and training["updateTime"].endswith("Z")


def test_throttled_unless_forced(job_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMJOB_STATUS_INTERVAL", "3600")
    reporter = StatusReporter.from_env()
    assert reporter.report({"step": 1})
    assert not reporter.report({"step": 2})
    assert reporter.report({"step": 3, "done": True}, force=True)
    assert [b["status"]["training"]["step"] for *_, b in Recorder.requests] == [1, 3]


def test_failures_never_raise_and_warn_once(job_env: str, caplog: pytest.LogCaptureFixture) -> None:
    Recorder.status_code = 403
    reporter = StatusReporter.from_env(min_interval=0)
    with caplog.at_level(logging.WARNING, logger="rmjob_trainer.status"):
        assert not reporter.report({"step": 1})
        assert not reporter.report({"step": 2})
    assert len(caplog.records) == 1 and "403" in caplog.records[0].getMessage()
    unreachable = StatusReporter("http://127.0.0.1:1", "ns", "name", min_interval=0, timeout=1)
    assert not unreachable.report({"step": 1})


def test_status_module_stays_light() -> None:
    import subprocess
    import sys
    code = "import sys, rmjob_trainer.status; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_in_cluster_credentials_from_the_service_account_dir_override(
        monkeypatch: pytest.MonkeyPatch, tmp_path, api_server: str) -> None:
    """A pod run outside a container (hack/cluster/pod_runner.py) has its token and CA elsewhere:
    RMJOB_SERVICE_ACCOUNT_DIR names that directory, and the reporter sends that token over TLS."""
    import ssl
    import subprocess

    account_dir = tmp_path / "serviceaccount"
    account_dir.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp_path / "server.key"), "-out", str(account_dir / "ca.crt")],
                   check=True, capture_output=True)
    (account_dir / "token").write_text("pod-bound-token\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(account_dir / "ca.crt", tmp_path / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RMJOB_JOB_NAME", "rm-1")
        monkeypatch.setenv("RMJOB_NAMESPACE", "team-a")
        monkeypatch.delenv("RMJOB_KUBE_API", raising=False)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
        monkeypatch.setenv("RMJOB_SERVICE_ACCOUNT_DIR", str(account_dir))
        reporter = StatusReporter.from_env()
        assert reporter is not None
        assert reporter.report({"step": 1})
    finally:
        server.shutdown()
    ((_, path, _, body),) = Recorder.requests
    assert path.endswith("/namespaces/team-a/rewardmodeljobs/rm-1/status")
    assert Recorder.authorizations == ["Bearer pod-bound-token"]
