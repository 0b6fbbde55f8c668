"""The spec model: generated from RewardConfig, and trainer.yaml the trainer accepts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml
from test_invalid_specs import FULL, MINIMAL, with_changes

from rmjob_operator.spec import (
    OPERATOR_OWNED,
    InvalidSpec,
    OUTPUT_MOUNT_PATH,
    RewardModelJobSpec,
    TrainerSpec,
    parse_spec,
)
from rmjob_trainer import cli
from rmjob_trainer.config import CONFIG_FIELDS, RewardConfig

TRAINER_FIELDS = [name for name in CONFIG_FIELDS if name not in OPERATOR_OWNED]


def test_trainer_section_has_every_trainer_field_the_operator_does_not_own():
    assert list(TrainerSpec.model_fields) == TRAINER_FIELDS
    assert set(OPERATOR_OWNED) <= set(CONFIG_FIELDS)  # a renamed trainer field must be noticed


def test_trainer_fields_are_camel_case():
    aliases = {name: f.alias for name, f in TrainerSpec.model_fields.items()}
    assert aliases["per_device_train_batch_size"] == "perDeviceTrainBatchSize"
    assert aliases["warm_up_steps"] == "warmUpSteps"
    assert all("_" not in alias for alias in aliases.values())


def test_trainer_schema_follows_the_dataclass():
    props = TrainerSpec.model_json_schema(by_alias=True)["properties"]
    hints = typing.get_type_hints(RewardConfig)
    for name in TRAINER_FIELDS:
        field, prop = CONFIG_FIELDS[name], props[TrainerSpec.model_fields[name].alias]
        assert prop["description"].split()[:2] == field.metadata["help"].split()[:2], name
        if "minimum" in field.metadata:
            assert prop.get("minimum", prop.get("anyOf", [{}])[0].get("minimum")) == field.metadata["minimum"], name
        if typing.get_origin(hints[name]) is typing.Literal:
            assert prop["enum"] == list(typing.get_args(hints[name])), name
    assert props["learningRate"]["exclusiveMinimum"] == 0
    assert set(TrainerSpec.model_json_schema(by_alias=True)["required"]) == {"datasetMixer", "modelNameOrPath"}


def test_trainer_defaults_are_the_dataclass_defaults_except_the_output_dir():
    trainer = parse_spec(MINIMAL).trainer
    for field in dataclasses.fields(RewardConfig):
        if field.name in OPERATOR_OWNED or field.metadata.get("required"):
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        expected = OUTPUT_MOUNT_PATH if field.name == "output_dir" else default
        assert getattr(trainer, field.name) == expected, field.name


def test_help_strings_name_camel_case_fields():
    description = TrainerSpec.model_fields["dataset_eval_mixer"].description
    assert "datasetMixer" in description and "--" not in description


def trainer_yaml_to_config(spec: dict, tmp_path) -> RewardConfig:
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(parse_spec(spec).trainer_config()))
    return cli.parse_args(["--config", str(path)])


def test_trainer_yaml_is_accepted_by_the_trainer_cli(tmp_path):
    cfg = trainer_yaml_to_config(FULL, tmp_path)
    assert cfg.learning_rate == 3e-6
    assert cfg.dataset_mixer == {"org/a": 0.5, "org/b": 20000}
    assert cfg.dataset_train_splits == ["train", "train_prefs"]
    assert cfg.deepspeed == "/etc/rmjob/deepspeed.json"
    assert (cfg.push_to_hub, cfg.hf_repo_id, cfg.hf_entity, cfg.hf_repo_private) == (True, "rm-pythia", "org", True)
    assert (cfg.with_tracking, cfg.wandb_project_name, cfg.wandb_entity) == (True, "rm", "org")
    assert cfg.output_dir == OUTPUT_MOUNT_PATH


def test_minimal_trainer_yaml_turns_the_operator_owned_features_off(tmp_path):
    cfg = trainer_yaml_to_config(MINIMAL, tmp_path)
    assert (cfg.deepspeed, cfg.push_to_hub, cfg.with_tracking) == (None, False, False)
    assert cfg.model_name_or_path == "EleutherAI/pythia-14m"


def test_trainer_config_holds_trainer_keys_only():
    config = parse_spec(FULL).trainer_config()
    assert set(config) <= set(CONFIG_FIELDS)
    assert None not in config.values()
    assert "hf-token" not in yaml.safe_dump(config)  # secrets reach the pod as env, not in the file


def test_stage_zero_does_not_use_deepspeed():
    spec = with_changes(MINIMAL, deepspeed={"stage": 0})
    assert "deepspeed" not in parse_spec(spec).trainer_config()


def test_spec_is_typed_and_immutable():
    spec = parse_spec(FULL)
    assert isinstance(spec, RewardModelJobSpec)
    assert spec.world_size == 16
    assert spec.hub.token_secret_ref.name == "hf-token"
    with pytest.raises(Exception):
        spec.resources.nodes = 3  # type: ignore[misc]


def test_camel_case_round_trip():
    spec = parse_spec(FULL)
    assert parse_spec(spec.model_dump(by_alias=True, exclude_none=True)) == spec


def test_cpu_world_size_counts_one_process_per_node():
    assert parse_spec(with_changes(MINIMAL, resources={"nodes": 3, "gpusPerNode": 0})).world_size == 3


def test_operator_modules_import_neither_torch_nor_kopf():
    code = (
        "import sys, rmjob_operator, rmjob_operator.spec, rmjob_operator.crd, rmjob_operator.render\n"
        "heavy = sorted(m for m in ('torch', 'kopf', 'transformers', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_operator_module_imports_torch():
    code = (
        "import importlib, pkgutil, sys, rmjob_operator\n"
        "for m in pkgutil.iter_modules(rmjob_operator.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('rmjob_operator.' + m.name)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- spec.storage and runPolicy.terminationGracePeriodSeconds (issue 9) ---------------------

from kube_schema import admission_errors, apply_defaults, committed_schema, rule_evaluations  # noqa: E402
from test_invalid_specs import resource  # noqa: E402

INVALID_STORAGE = {
    "storage without a claim": (with_changes(MINIMAL, storage={}), "spec.storage"),
    "existing and created claim": (with_changes(MINIMAL, storage={"existingClaim": "a", "size": "1Gi"}),
                                   "spec.storage"),
    "existing claim with access modes": (
        with_changes(MINIMAL, storage={"existingClaim": "a", "accessModes": ["ReadWriteMany"]}),
        "spec.storage.existingClaim"),
    "existing claim retained": (with_changes(MINIMAL, storage={"existingClaim": "a", "retainOnDelete": True}),
                                "spec.storage.existingClaim"),
    "subPath of a created claim": (with_changes(MINIMAL, storage={"size": "1Gi", "subPath": "x"}),
                                   "spec.storage.subPath"),
    "absolute subPath": (with_changes(MINIMAL, storage={"existingClaim": "a", "subPath": "/x"}),
                         "spec.storage.subPath"),
    "subPath climbing out of the claim": (with_changes(MINIMAL, storage={"existingClaim": "a", "subPath": "a/../.."}),
                                         "spec.storage.subPath"),
    "size not a quantity": (with_changes(MINIMAL, storage={"size": "lots"}), "spec.storage.size"),
    "size with a line break after it": (with_changes(MINIMAL, storage={"size": "1Gi\n"}), "spec.storage.size"),
    "storage class with a line break after it": (
        with_changes(MINIMAL, storage={"size": "1Gi", "storageClassName": "fast\n"}), "spec.storage.storageClassName"),
    # The API server refuses the claim ("must be greater than zero") only once the job runs.
    "zero size": (with_changes(MINIMAL, storage={"size": "0Gi"}), "spec.storage.size"),
    "zero size as a number": (with_changes(MINIMAL, storage={"size": 0}), "spec.storage.size"),
    "negative size": (with_changes(MINIMAL, storage={"size": "-1Gi"}), "spec.storage.size"),
    "storage class not a DNS name": (with_changes(MINIMAL, storage={"size": "1Gi", "storageClassName": "Fast_SSD"}),
                                     "spec.storage.storageClassName"),
    "existing claim not a DNS name": (with_changes(MINIMAL, storage={"existingClaim": "Team Claim"}),
                                      "spec.storage.existingClaim"),
    "unknown access mode": (with_changes(MINIMAL, storage={"size": "1Gi", "accessModes": ["ReadOnlyMany"]}),
                            "spec.storage.accessModes[0]"),
    "two nodes on a read-write-once claim": (
        with_changes(MINIMAL, resources={"nodes": 2}, storage={"size": "1Gi", "accessModes": ["ReadWriteOnce"]}),
        "spec.storage.accessModes"),
    "output dir outside the claim": (
        with_changes(MINIMAL, trainer={"outputDir": "/data/rm"}, storage={"size": "1Gi"}), "spec.trainer.outputDir"),
    "output dir only prefixed like the claim": (
        with_changes(MINIMAL, trainer={"outputDir": "/outputs"}, storage={"size": "1Gi"}), "spec.trainer.outputDir"),
    "a user volume at /output next to storage": (
        with_changes(MINIMAL, storage={"size": "1Gi"}, resources={
            "volumes": [{"name": "out", "emptyDir": {}}], "volumeMounts": [{"name": "out", "mountPath": "/output/"}]}),
        "spec.resources.volumeMounts"),
    "negative grace period": (with_changes(MINIMAL, runPolicy={"terminationGracePeriodSeconds": -1}),
                              "spec.runPolicy.terminationGracePeriodSeconds"),
}
VALID_STORAGE = {
    "created claim": with_changes(MINIMAL, storage={"size": "20Gi"}),
    "existing claim in a directory": with_changes(MINIMAL, storage={"existingClaim": "team", "subPath": "rm/a"}),
    "two nodes, access modes left to the operator": with_changes(MINIMAL, resources={"nodes": 2},
                                                                 storage={"size": "1Ti"}),
    "two nodes on a read-write-many claim": with_changes(
        MINIMAL, resources={"nodes": 2},
        storage={"size": 100, "accessModes": ["ReadWriteMany"], "storageClassName": "nfs", "retainOnDelete": True}),
    "output dir below the claim": with_changes(MINIMAL, trainer={"outputDir": "/output/rm"}, storage={"size": "1Gi"}),
    "fractional size": with_changes(MINIMAL, storage={"size": "0.5Gi", "storageClassName": "fast.ssd-1"}),
}


@pytest.fixture(scope="module")
def crd_schema() -> dict:
    return committed_schema()


@pytest.mark.parametrize(("spec", "field"), INVALID_STORAGE.values(), ids=INVALID_STORAGE.keys())
def test_invalid_storage_is_rejected_by_the_crd_and_by_parse_spec(crd_schema, spec, field):
    errors = admission_errors(crd_schema, resource(spec))
    assert errors, "the API server would accept this spec"
    assert any(field.rsplit(".", 1)[-1].split("[")[0] in error for error in errors), errors
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    assert caught.value.field == field, caught.value.errors


@pytest.mark.parametrize("spec", VALID_STORAGE.values(), ids=VALID_STORAGE.keys())
def test_valid_storage_is_accepted_by_both(crd_schema, spec):
    assert admission_errors(crd_schema, resource(spec)) == []
    parse_spec(spec)


@pytest.mark.parametrize("spec", [*VALID_STORAGE.values(), *(spec for spec, _ in INVALID_STORAGE.values())],
                         ids=[*VALID_STORAGE.keys(), *INVALID_STORAGE.keys()])
def test_storage_rules_read_an_absent_field_as_its_default(crd_schema, spec):
    raw = resource(spec)
    on_raw = {(path, rule["rule"]): passed for path, rule, passed in rule_evaluations(crd_schema, raw)}
    defaulted = apply_defaults(crd_schema, raw)
    on_defaulted = {(path, rule["rule"]): passed for path, rule, passed in rule_evaluations(crd_schema, defaulted)
                    if (path, rule["rule"]) in on_raw}
    assert on_raw == on_defaulted


def test_storage_turns_checkpoints_on_unless_the_trainer_section_sets_them():
    assert "checkpointing_steps" not in parse_spec(MINIMAL).trainer_config()
    assert parse_spec(with_changes(MINIMAL, storage={"size": "1Gi"})).trainer_config()["checkpointing_steps"] == 100
    explicit = with_changes(MINIMAL, storage={"size": "1Gi"}, trainer={"checkpointingSteps": 5})
    assert parse_spec(explicit).trainer_config()["checkpointing_steps"] == 5


def test_grace_period_default_leaves_time_for_a_checkpoint():
    assert parse_spec(MINIMAL).run_policy.termination_grace_period_seconds == 300
