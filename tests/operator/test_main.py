"""``python -m rmjob_operator``: the command line maps onto kopf.run; nothing heavy is imported."""

from __future__ import annotations

import logging
import subprocess
import sys

import kopf
import pytest

from rmjob_operator import __main__ as entry


@pytest.fixture(autouse=True)
def cluster_reachable(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The start-up check passes (tests/operator/test_startup.py covers it); returns its timeouts."""
    timeouts: list[float] = []
    monkeypatch.setattr(entry, "check_cluster_access", timeouts.append)
    return timeouts


@pytest.fixture(autouse=True)
def restore_logging() -> None:
    """main() installs kopf's log handler on the root logger; keep it out of other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("argv", "expected"), [
    ([], {"clusterwide": True, "namespaces": [], "standalone": True, "peering_name": None}),
    (["-n", "a", "--namespace", "team-*"], {"clusterwide": False, "namespaces": ["a", "team-*"]}),
    (["--all-namespaces", "--peering", "rmjob", "--liveness", "http://0.0.0.0:8080/healthz"],
     {"clusterwide": True, "standalone": False, "peering_name": "rmjob",
      "liveness_endpoint": "http://0.0.0.0:8080/healthz"}),
])
def test_arguments_map_onto_kopf_run(argv: list[str], expected: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    entry.main(argv)
    (kwargs,) = calls
    assert {key: kwargs[key] for key in expected} == expected


def test_startup_timeout_reaches_the_cluster_check(cluster_reachable: list[float],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopf, "run", lambda **kwargs: None)
    entry.main([])
    entry.main(["--startup-timeout", "2.5"])
    assert cluster_reachable == [30.0, 2.5]


def test_logs_are_json_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopf, "run", lambda **kwargs: None)
    entry.main([])
    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "_KopfStreamHandler"]
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "hello", None, None)
    assert handlers and handlers[0].format(record).startswith("{")


def test_namespace_and_all_namespaces_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        entry.parse_args(["-n", "a", "-A"])


def test_operator_never_imports_torch() -> None:
    code = "import sys, rmjob_operator.handlers, rmjob_operator.__main__; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
