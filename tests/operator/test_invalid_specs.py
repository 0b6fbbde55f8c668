"""Bad RewardModelJobs are refused twice, the same way: by the API server (the generated CRD's
schema and CEL rules) and by the operator's parse_spec (with the offending field's path)."""

from __future__ import annotations

import copy

import pytest
import yaml
from kube_schema import REPO, admission_errors, apply_defaults, committed_schema, rule_evaluations

from rmjob_operator.spec import InvalidSpec, check_name, parse_spec

MINIMAL = {
    "trainer": {
        "modelNameOrPath": "EleutherAI/pythia-14m",
        "datasetMixer": {"trl-internal-testing/sentiment-trl-style": 1.0},
    }
}
SECRET = {"name": "hf-token", "key": "token"}
FULL = {
    "trainer": {
        "modelNameOrPath": "EleutherAI/pythia-1b-deduped",
        "datasetMixer": {"org/a": 0.5, "org/b": 20000},
        "datasetTrainSplits": ["train", "train_prefs"],
        "datasetEvalMixer": {"org/a": 1.0},
        "datasetEvalSplits": ["test"],
        "chatTemplate": "simple_concat_with_space",
        "learningRate": 3e-6,
        "perDeviceTrainBatchSize": 16,
        "gradientAccumulationSteps": 4,
        "maxTokenLength": 1024,
        "maxPromptTokenLength": 512,
        "mixedPrecision": "bf16",
        "checkpointingSteps": 100,
    },
    "resources": {
        "nodes": 2,
        "gpusPerNode": 8,
        "image": "registry.example/rmjob-trainer:1",
        "imagePullPolicy": "IfNotPresent",
        "imagePullSecrets": [{"name": "regcred"}],
        "resources": {"requests": {"cpu": "32", "memory": "400Gi"}, "limits": {"memory": "400Gi"}},
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}},
        "priorityClassName": "training",
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"},
                {"name": "S3_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}}],
        "volumes": [{"name": "out", "persistentVolumeClaim": {"claimName": "rm-out"}}],
        "volumeMounts": [{"name": "out", "mountPath": "/output"}],
    },
    "deepspeed": {"stage": 3, "offloadOptimizer": True, "offloadParams": True, "config": {"gradient_clipping": 1.0}},
    "hub": {"push": True, "repoId": "rm-pythia", "entity": "org", "tokenSecretRef": SECRET},
    "tracking": {"wandb": {"project": "rm", "entity": "org", "apiKeySecretRef": {"name": "wandb", "key": "key"}}},
    "runPolicy": {"backend": "job", "backoffLimit": 2, "activeDeadlineSeconds": 86400,
                  "ttlSecondsAfterFinished": 3600, "queueName": "gpu-queue"},
}


def with_changes(base: dict, **sections) -> dict:
    """``base`` with each section's keys replaced (``None`` deletes a key)."""
    spec = copy.deepcopy(base)
    for section, changes in sections.items():
        if not isinstance(changes, dict):
            spec[section] = changes
            continue
        target = spec.setdefault(section, {})
        for key, value in changes.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return spec


def resource(spec: dict, name: str = "rm-sentiment") -> dict:
    return {"apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


INVALID = {
    "learning rate as a string": (with_changes(MINIMAL, trainer={"learningRate": "3e-6"}), "spec.trainer.learningRate"),
    "learning rate zero": (with_changes(MINIMAL, trainer={"learningRate": 0}), "spec.trainer.learningRate"),
    "boolean as a string": (with_changes(MINIMAL, trainer={"sanityCheck": "true"}), "spec.trainer.sanityCheck"),
    "missing model": (with_changes(MINIMAL, trainer={"modelNameOrPath": None}), "spec.trainer.modelNameOrPath"),
    "missing dataset mixer": (with_changes(MINIMAL, trainer={"datasetMixer": None}), "spec.trainer.datasetMixer"),
    "empty dataset mixer": (with_changes(MINIMAL, trainer={"datasetMixer": {}}), "spec.trainer.datasetMixer"),
    "fraction above 1": (with_changes(MINIMAL, trainer={"datasetMixer": {"d": 1.5}}), "spec.trainer.datasetMixer"),
    "fraction zero": (with_changes(MINIMAL, trainer={"datasetMixer": {"d": 0}}), "spec.trainer.datasetMixer"),
    "eval fraction negative": (with_changes(MINIMAL, trainer={"datasetEvalMixer": {"d": -0.5}}),
                               "spec.trainer.datasetEvalMixer"),
    "splits/mixer length mismatch": (with_changes(MINIMAL, trainer={"datasetTrainSplits": ["a", "b"]}),
                                     "spec.trainer.datasetTrainSplits"),
    "eval splits/mixer length mismatch": (
        with_changes(MINIMAL, trainer={"datasetEvalMixer": {"a": 1.0, "b": 1.0, "c": 1.0},
                                       "datasetEvalSplits": ["x", "y"]}),
        "spec.trainer.datasetEvalSplits"),
    "unknown chat template": (with_changes(MINIMAL, trainer={"chatTemplate": "chatml"}), "spec.trainer.chatTemplate"),
    "snake_case trainer key": (with_changes(MINIMAL, trainer={"learning_rate": 1e-5}), "spec.trainer.learning_rate"),
    "operator-owned trainer key": (with_changes(MINIMAL, trainer={"pushToHub": True}), "spec.trainer.pushToHub"),
    "unknown top-level field": (with_changes(MINIMAL, trainr={"x": 1}), "spec.trainr"),
    "negative nodes": (with_changes(MINIMAL, resources={"nodes": -1}), "spec.resources.nodes"),
    "zero nodes": (with_changes(MINIMAL, resources={"nodes": 0}), "spec.resources.nodes"),
    "negative gpus": (with_changes(MINIMAL, resources={"gpusPerNode": -1}), "spec.resources.gpusPerNode"),
    "bad pull policy": (with_changes(MINIMAL, resources={"imagePullPolicy": "Sometimes"}),
                        "spec.resources.imagePullPolicy"),
    "fractional cpu as a number": (with_changes(MINIMAL, resources={"resources": {"limits": {"cpu": 0.5}}}),
                                   "spec.resources.resources.limits.cpu"),
    "HF token as a plain env value": (
        with_changes(MINIMAL, resources={"env": [{"name": "HF_TOKEN", "value": "hf_xxx"}]}), "spec.resources.env"),
    "env var without name": (with_changes(MINIMAL, resources={"env": [{"value": "x"}]}), "spec.resources.env[0].name"),
    "env var with value and valueFrom": (
        with_changes(MINIMAL, resources={"env": [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.name"}}}]}), "spec.resources.env[0].valueFrom"),
    "volume named like the operator's": (
        with_changes(MINIMAL, resources={"volumes": [{"name": "rmjob-config", "emptyDir": {}}]}),
        "spec.resources.volumes"),
    "two volumes of one name": (
        with_changes(MINIMAL, resources={"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}),
        "spec.resources.volumes"),
    "duplicate mountPath": (
        with_changes(MINIMAL, resources={"volumes": [{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}],
                                         "volumeMounts": [{"name": "a", "mountPath": "/data"},
                                                          {"name": "b", "mountPath": "/data"}]}),
        "spec.resources.volumeMounts"),
    "mount over the operator's config": (
        with_changes(MINIMAL, resources={"volumes": [{"name": "a", "emptyDir": {}}],
                                         "volumeMounts": [{"name": "a", "mountPath": "/etc/rmjob"}]}),
        "spec.resources.volumeMounts"),
    "mount of a volume that is not there": (
        with_changes(MINIMAL, resources={"volumeMounts": [{"name": "a", "mountPath": "/data"}]}),
        "spec.resources.volumeMounts"),
    "unknown deepspeed stage": (with_changes(MINIMAL, deepspeed={"stage": 1}), "spec.deepspeed.stage"),
    "offloadParams with stage 2": (with_changes(MINIMAL, deepspeed={"stage": 2, "offloadParams": True}),
                                   "spec.deepspeed.offloadParams"),
    "offloadOptimizer without DeepSpeed": (with_changes(MINIMAL, deepspeed={"offloadOptimizer": True}),
                                           "spec.deepspeed.offloadOptimizer"),
    "DeepSpeed on CPU": (with_changes(MINIMAL, deepspeed={"stage": 2}, resources={"gpusPerNode": 0}),
                         "spec.deepspeed.stage"),
    "DeepSpeed bf16 with fp16 autocast": (
        with_changes(MINIMAL, deepspeed={"stage": 2}, trainer={"mixedPrecision": "fp16"}),
        "spec.trainer.mixedPrecision"),
    "hub token as plain text": (with_changes(MINIMAL, hub={"push": True, "token": "hf_xxx", "tokenSecretRef": SECRET}),
                                "spec.hub.token"),
    "push without token ref": (with_changes(MINIMAL, hub={"push": True}), "spec.hub.tokenSecretRef"),
    "secret ref without key": (with_changes(MINIMAL, hub={"tokenSecretRef": {"name": "hf"}}),
                               "spec.hub.tokenSecretRef.key"),
    "W&B key as plain text": (
        with_changes(MINIMAL, tracking={"wandb": {"apiKey": "abc", "apiKeySecretRef": SECRET}}),
        "spec.tracking.wandb.apiKey"),
    "W&B without key ref": (with_changes(MINIMAL, tracking={"wandb": {"project": "p"}}),
                            "spec.tracking.wandb.apiKeySecretRef"),
    "bad backend": (with_changes(MINIMAL, runPolicy={"backend": "mpi"}), "spec.runPolicy.backend"),
    "negative backoffLimit": (with_changes(MINIMAL, runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit"),
    "zero deadline": (with_changes(MINIMAL, runPolicy={"activeDeadlineSeconds": 0}),
                      "spec.runPolicy.activeDeadlineSeconds"),
    "section of the wrong type": (with_changes(MINIMAL, runPolicy=["job"]), "spec.runPolicy"),
}

VALID = {
    "minimal": MINIMAL,
    "full": FULL,
    "row counts and one split for two datasets": with_changes(
        MINIMAL, trainer={"datasetMixer": {"a": 1000, "b": 0.25}, "datasetTrainSplits": ["train"]}),
    "zero-2 without bf16": with_changes(
        MINIMAL, deepspeed={"stage": 2, "bf16": False, "offloadOptimizer": True}, trainer={"mixedPrecision": "no"}),
    "cpu smoke test": with_changes(MINIMAL, resources={"gpusPerNode": 0}, trainer={"sanityCheck": True}),
    "token for a gated base model, no push": with_changes(MINIMAL, hub={"tokenSecretRef": SECRET}),
}


@pytest.fixture(scope="module")
def schema() -> dict:
    return committed_schema()


@pytest.mark.parametrize(("spec", "field"), INVALID.values(), ids=INVALID.keys())
def test_invalid_spec_is_rejected_by_the_crd_and_by_parse_spec(schema, spec, field):
    errors = admission_errors(schema, resource(spec))
    assert errors, "the API server would accept this spec"
    assert any(field.rsplit(".", 1)[-1] in error for error in errors), errors  # for the same reason
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    assert caught.value.field == field, caught.value.errors
    assert str(caught.value).startswith(f"{field}: ")


def test_at_least_15_invalid_specs():
    assert len(INVALID) >= 15


@pytest.mark.parametrize("spec", VALID.values(), ids=VALID.keys())
def test_valid_spec_is_accepted_by_both(schema, spec):
    assert admission_errors(schema, resource(spec)) == []
    parse_spec(spec)


@pytest.mark.parametrize("spec", [*VALID.values(), *(spec for spec, _ in INVALID.values())],
                         ids=[*VALID.keys(), *INVALID.keys()])
def test_rules_read_an_absent_field_as_its_default(schema, spec):
    """Every rule gives the same verdict on the job as written as on the job with the schema's
    defaults filled in: the rules can run where the API server has not defaulted (the CRD's own
    defaults, when the CRD is created) and mean the same there as on a defaulted job."""
    raw = resource(spec)
    on_raw = {(path, rule["rule"]): passed for path, rule, passed in rule_evaluations(schema, raw)}
    defaulted = apply_defaults(schema, raw)
    on_defaulted = {(path, rule["rule"]): passed for path, rule, passed in rule_evaluations(schema, defaulted)
                    if (path, rule["rule"]) in on_raw}
    assert on_raw == on_defaulted


def example_specs() -> list:
    paths = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
    docs = [(p, d) for p in paths for d in yaml.safe_load_all(p.read_text())]
    return [pytest.param(d, id=p.name) for p, d in docs if d and d.get("kind") == "RewardModelJob"]


@pytest.mark.parametrize("job", example_specs())
def test_shipped_examples_are_valid(schema, job):
    assert admission_errors(schema, job) == []
    check_name(job["metadata"]["name"])
    parse_spec(job["spec"])


@pytest.mark.parametrize("name", ["RM-Job", "rm_job", "1rm", "rm-", "r" * 49, "rm-job\n"])
def test_names_that_cannot_name_a_service_are_rejected(schema, name):
    assert admission_errors(schema, resource(MINIMAL, name))
    with pytest.raises(InvalidSpec, match="metadata.name"):
        check_name(name)


def test_longest_allowed_name(schema):
    name = "r" * 48
    assert admission_errors(schema, resource(MINIMAL, name)) == []
    check_name(name)


def test_every_error_is_reported():
    spec = with_changes(MINIMAL, trainer={"learningRate": -1}, resources={"nodes": 0})
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    fields = [field for field, _ in caught.value.errors]
    assert fields == ["spec.trainer.learningRate", "spec.resources.nodes"]
    assert "(and 1 more)" in str(caught.value)


def test_not_an_object():
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(["trainer"])  # type: ignore[arg-type]
    assert caught.value.field == "spec"

