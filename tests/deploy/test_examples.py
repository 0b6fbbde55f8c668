"""manifests/examples: valid RewardModelJobs that carry the seed commands' exact hyper-parameters."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import EXAMPLES, MANIFESTS, REPO, load_all
from rmjob_operator.render import render_children
from rmjob_operator.spec import parse_spec
from rmjob_trainer.cli import parse_args

SEED_DOC = REPO.parent / "shared" / "seed" / "reward_modeling.md"
K8S_VERSION = kubernetes_validate.latest_version()
# Not hyper-parameters: where the model goes differs in a cluster (the /output volume), and
# DeepSpeed comes from the spec's deepspeed section (compared to the seed's accelerate config).
NOT_COMPARED = {"output_dir", "deepspeed"}


def jobs(path: Path) -> list[dict]:
    return [doc for doc in load_all(path.read_text()) if doc["kind"] == "RewardModelJob"]


def all_jobs() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{job['metadata']['name']}", job) for path in EXAMPLES for job in jobs(path)]


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    crd = yaml.safe_load((MANIFESTS / "crd.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def test_one_example_per_seed_level_plus_pvc():
    names = {path.name for path in EXAMPLES}
    assert {"level0-debug.yaml", "level1-sentiment.yaml", "level1.1-dataset-mixing.yaml", "level2-hh-zero2.yaml",
            "level2.1-hh-zero3.yaml", "level3-ultrafeedback-8b-zero3.yaml", "pvc-dataset.yaml"} <= names


@pytest.mark.parametrize("name, job", all_jobs(), ids=[n for n, _ in all_jobs()])
def test_example_is_a_valid_job(crd_schema, name, job):
    # OpenAPI v3.0 schemas are JSON Schema draft 4 (boolean exclusiveMinimum).
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft4Validator(crd_schema).iter_errors(job)]
    assert not errors
    spec = parse_spec(job["spec"])  # the operator's own validation, unknown fields included
    # Credentials only ever come from Secrets.
    if spec.hub.push:
        assert job["spec"]["hub"]["tokenSecretRef"]["name"]
    if spec.tracking.wandb is not None:
        assert job["spec"]["tracking"]["wandb"]["apiKeySecretRef"]["name"]


@pytest.mark.parametrize("name, job", all_jobs(), ids=[n for n, _ in all_jobs()])
def test_example_renders_valid_kubernetes_objects(name, job):
    job = {**job, "metadata": {**job["metadata"], "namespace": "ml", "uid": "0"}}
    assert render_children(job, "pytorchjob")[-1]["kind"] == "PyTorchJob"
    for child in render_children(job, "job"):  # built-in kinds only: kubernetes_validate knows them
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_pvc_example_mounts_its_claim_and_trains_from_it():
    objects = load_all((MANIFESTS / "examples" / "pvc-dataset.yaml").read_text())
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    kubernetes_validate.validate(claim, K8S_VERSION, strict=True)
    (job,) = [o for o in objects if o["kind"] == "RewardModelJob"]
    resources = job["spec"]["resources"]
    (volume,) = [v for v in resources["volumes"] if v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]]
    mount_paths = [m["mountPath"] for m in resources["volumeMounts"] if m["name"] == volume["name"]]
    assert "/output" in mount_paths  # the model outlives the pods
    (dataset,) = job["spec"]["trainer"]["datasetMixer"]
    assert any(dataset.startswith(path + "/") for path in mount_paths)


# --- the seed's commands ---------------------------------------------------------------------


@dataclasses.dataclass
class SeedRun:
    level: str
    argv: list[str]          # the reward_modeling.py flags
    gpus: int | None         # mason.py --gpus (None: not given)
    deepspeed_stage: int     # from accelerate's --config_file deepspeed_zeroN.yaml (0: none)


def seed_runs() -> list[SeedRun]:
    """Every reward_modeling.py command of the seed doc, keyed by its section's level."""
    runs, level = [], None
    text = SEED_DOC.read_text()
    for match in re.finditer(r"^#+\s*level\s+([\d.]+)\b[^\n]*$|^```bash\n(.*?)^```", text, re.M | re.S | re.I):
        if match.group(1):
            level = match.group(1)
            continue
        tokens = shlex.split(match.group(2).replace("\\\n", " "))
        script = next((i for i, t in enumerate(tokens) if t.endswith("reward_modeling.py")), None)
        if script is None or level is None:
            continue
        launcher = tokens[:script]
        gpus = launcher[launcher.index("--gpus") + 1] if "--gpus" in launcher else None
        config = launcher[launcher.index("--config_file") + 1] if "--config_file" in launcher else ""
        stage = re.search(r"zero(\d)", config)
        runs.append(SeedRun(level, tokens[script + 1:], int(gpus) if gpus and gpus.isdigit() else None,
                            int(stage.group(1)) if stage else 0))
    return runs


def example_for(level: str) -> dict:
    (path,) = [p for p in EXAMPLES if p.name.startswith(f"level{level}-")]
    (job,) = jobs(path)
    return job


def trainer_yaml_config(job: dict, tmp_path: Path):
    """What the pod's trainer reads: the operator's trainer.yaml, through the trainer's own parser."""
    config = tmp_path / "trainer.yaml"
    config.write_text(yaml.safe_dump(parse_spec(job["spec"]).trainer_config()))
    return parse_args(["--config", str(config)])


@pytest.mark.skipif(not SEED_DOC.exists(), reason=f"seed doc not present at {SEED_DOC}")
def test_seed_doc_has_the_six_levels():
    assert [run.level for run in seed_runs()] == ["0", "1", "1.1", "2", "2.1", "3"]


@pytest.mark.skipif(not SEED_DOC.exists(), reason=f"seed doc not present at {SEED_DOC}")
@pytest.mark.parametrize("level", ["0", "1", "1.1", "2", "2.1", "3"])
def test_example_has_the_seed_hyper_parameters(level, tmp_path):
    (seed,) = [run for run in seed_runs() if run.level == level]
    job = example_for(level)

    expected = dataclasses.asdict(parse_args(seed.argv))
    actual = dataclasses.asdict(trainer_yaml_config(job, tmp_path))
    for key in NOT_COMPARED:
        expected.pop(key), actual.pop(key)
    assert actual == expected

    spec = parse_spec(job["spec"])
    assert spec.deepspeed.stage == seed.deepspeed_stage
    if seed.gpus is not None:
        assert spec.resources.nodes * spec.resources.gpus_per_node == seed.gpus
