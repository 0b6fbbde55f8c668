"""Shared fixtures for the deployment tests: repository paths, the real helm/kubectl binaries."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rmjob-operator"
MANIFESTS = REPO / "manifests"
EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))


def _load_install_tools():
    spec = importlib.util.spec_from_file_location("install_tools", REPO / "scripts" / "install_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install_tools = _load_install_tools()


@pytest.fixture(scope="session")
def tools() -> Path:
    """The directory holding helm and kubectl (what `make install` puts in .tools/bin; idempotent)."""
    dest = REPO / ".tools" / "bin"
    install_tools.install(dest)
    return dest


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stderr}")
    return result


def load_all(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def helm_template(tools: Path):
    """``helm_template(*flags) -> list of rendered objects`` (release rmjob-operator in rmjob-system)."""

    def render(*flags: str) -> list[dict]:
        out = run(tools / "helm", "template", "rmjob-operator", CHART, "--namespace", "rmjob-system", *flags)
        return load_all(out.stdout)

    return render


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]
