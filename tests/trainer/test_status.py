"""StatusReporter: environment detection, the patch it sends (through the kubernetes client),
throttling, retries, token rotation, never raising; ReportSender: the training loop never waits."""

from __future__ import annotations

import datetime
import http.server
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubernetes.client import Configuration

from rmjob_trainer.status import ReportSender, StatusReporter


class Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str, dict]] = []
    authorizations: list[str | None] = []
    queries: list[str] = []
    status_code = 200
    status_codes: list[int] = []  # answered first, one per request, before status_code
    release: threading.Event | None = None  # when set: answer only once it is set

    def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path, _, query = self.path.partition("?")
        Recorder.requests.append((self.command, path, self.headers["Content-Type"], body))
        Recorder.queries.append(query)
        Recorder.authorizations.append(self.headers.get("Authorization"))
        if Recorder.release is not None:
            Recorder.release.wait(60)
        self.send_response(Recorder.status_codes.pop(0) if Recorder.status_codes else Recorder.status_code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    Recorder.requests, Recorder.authorizations, Recorder.status_code = [], [], 200
    Recorder.status_codes, Recorder.release, Recorder.queries = [], None, []
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


def test_off_outside_a_job_without_the_kubernetes_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that trains without Kubernetes (the GPU check's image) may lack the client."""
    monkeypatch.delenv("RMJOB_JOB_NAME", raising=False)
    for module in ("kubernetes", "kubernetes.client", "kubernetes.config"):
        monkeypatch.setitem(sys.modules, module, None)  # `import kubernetes` raises ImportError
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
    assert Recorder.queries == ["fieldManager=rmjob-trainer"]  # the writer, in managedFields
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
    unreachable = StatusReporter(Configuration(host="http://127.0.0.1:1"), "ns", "name", min_interval=0, timeout=1)
    assert not unreachable.report({"step": 1})


def test_status_module_stays_light() -> None:
    import subprocess
    import sys
    code = "import sys, rmjob_trainer.status; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture
def in_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path, api_server: str) -> Iterator[Path]:
    """A TLS API server and a service-account directory (token, CA) named by the in-cluster env,
    as a pod run outside a container has them (hack/cluster/pod_runner.py)."""
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
    monkeypatch.setenv("RMJOB_JOB_NAME", "rm-1")
    monkeypatch.setenv("RMJOB_NAMESPACE", "team-a")
    monkeypatch.delenv("RMJOB_KUBE_API", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    monkeypatch.setenv("RMJOB_SERVICE_ACCOUNT_DIR", str(account_dir))
    yield account_dir
    server.shutdown()


def test_in_cluster_credentials_from_the_service_account_dir_override(in_cluster: Path) -> None:
    """RMJOB_SERVICE_ACCOUNT_DIR names the token and CA directory, and the reporter sends that
    token (without the file's line end) over TLS checked against that CA."""
    reporter = StatusReporter.from_env()
    assert reporter is not None
    assert reporter.report({"step": 1})
    ((_, path, _, body),) = Recorder.requests
    assert path.endswith("/namespaces/team-a/rewardmodeljobs/rm-1/status")
    assert Recorder.authorizations == ["bearer pod-bound-token"]


def test_the_in_cluster_env_of_a_replaced_os_environ_is_read(in_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' map with num_proc replaces os.environ by a copy, after which the environment of
    the kubernetes client's import (its loader's default) is no longer the process's."""
    import os

    import kubernetes.config.incluster_config  # noqa: F401  (imported before the replacement)

    replaced = os.environ
    monkeypatch.setattr(os, "environ", dict(replaced))
    monkeypatch.delitem(replaced, "KUBERNETES_SERVICE_HOST")
    reporter = StatusReporter.from_env()
    assert reporter is not None and reporter.report({"step": 1})


def test_the_token_file_line_end_is_left_out_of_every_request(in_cluster: Path) -> None:
    """Not only the first: a header with a line end is refused by http.client, so every later
    report would fail."""
    reporter = StatusReporter.from_env(min_interval=0)
    assert [reporter.report({"step": step}) for step in (1, 2, 3)] == [True, True, True]
    assert Recorder.authorizations == ["bearer pod-bound-token"] * 3


def test_a_rotated_token_is_read_again(in_cluster: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet replaces a projected token file well before the token expires; a reporter
    that kept the first token would be refused for the rest of a long run."""
    from kubernetes.config import incluster_config

    reporter = StatusReporter.from_env(min_interval=0)
    assert reporter.report({"step": 1})
    (in_cluster / "token").write_text("rotated-token")

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(minutes=2)

    # The client reads the file again once the token it holds is a minute old: two minutes on,
    # by the clock of the client's in-cluster config.
    monkeypatch.setattr(incluster_config, "datetime", types.SimpleNamespace(datetime=Later,
                                                                            timedelta=datetime.timedelta))
    assert reporter.report({"step": 2})
    assert Recorder.authorizations == ["bearer pod-bound-token", "bearer rotated-token"]


def test_overloaded_or_failing_api_server_is_retried_with_backoff(job_env: str) -> None:
    Recorder.status_codes = [429, 503]
    reporter = StatusReporter.from_env(min_interval=0)
    assert reporter.report({"step": 1})
    assert [b["status"]["training"]["step"] for *_, b in Recorder.requests] == [1, 1, 1]
    Recorder.status_codes = [503] * 10  # more failures than retries: given up, not raised
    assert not reporter.report({"step": 2})
    assert len(Recorder.requests) == 3 + 4


def test_an_unanswered_request_is_bounded(job_env: str) -> None:
    Recorder.release = threading.Event()  # never set: the server reads the patch and never answers
    reporter = StatusReporter(Configuration(host=job_env), "team-a", "rm-1", min_interval=0, timeout=0.2)
    assert not reporter.report({"step": 1})
    assert len(Recorder.requests) == 4  # the first attempt and its retries, each cut off


def test_the_sender_returns_before_the_api_server_answers(job_env: str) -> None:
    """What the training loop calls: it never waits for the API server; the newest report waits
    in place of older ones, and close() gives it a bounded time."""
    Recorder.release = threading.Event()
    sender = ReportSender(StatusReporter.from_env(min_interval=0))
    sender.report({"step": 1})  # returns while the server holds this request
    deadline = time.monotonic() + 30
    while not Recorder.requests:
        assert time.monotonic() < deadline, "the first report never reached the server"
        time.sleep(0.01)
    sender.report({"step": 2})
    sender.report({"step": 3, "done": True}, force=True)
    sender.report({"step": 3, "done": True, "hub": {"repo": "me/rm"}})
    assert not sender.close(timeout=0.1)  # still held: close() gives up, nothing raised
    Recorder.release.set()
    assert sender.close(timeout=30)
    sent = [b["status"]["training"] for *_, b in Recorder.requests]
    assert [t["step"] for t in sent] == [1, 3] and sent[-1]["hub"] == {"repo": "me/rm"}
