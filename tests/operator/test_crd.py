"""The generated CRD: committed copies up to date, structural, and what kubectl users see."""

from __future__ import annotations

import celpy
import kubernetes_validate
import pytest
import yaml
from kube_schema import CHART_CRD_PATH, CRD_PATH, REPO, cel_errors, committed_schema, schema_errors

from rmjob_operator import crd
from rmjob_operator.crd import build_crd, crd_yaml, openapi_schema, reference_markdown, structural_errors

K8S_VERSION = "1.33"


def test_committed_crd_is_up_to_date():
    assert CRD_PATH.read_text() == crd_yaml(), "run `make crd`"


def test_chart_crd_is_identical():
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), "run `make crd`"


def test_spec_reference_is_up_to_date():
    assert (REPO / "docs" / "spec-reference.md").read_text() == reference_markdown(), "run `make crd`"


def test_cli_prints_the_crd(capsys):
    crd.main([])
    assert capsys.readouterr().out == crd_yaml()


def test_schema_is_structural():
    assert structural_errors(openapi_schema()) == []


@pytest.mark.parametrize(
    ("schema", "error"),
    [
        ({"type": "object", "properties": {"a": {}}}, ".a: no type"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, ".a: $ref is not allowed"),
        ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}}},
         ".a: anyOf is only allowed for int-or-string"),
        ({"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
         "<root>: additionalProperties and properties are mutually exclusive"),
        ({"type": "object", "additionalProperties": False}, "<root>: additionalProperties must be a schema"),
        ({"type": "array"}, "<root>: array without items"),
    ],
)
def test_structural_checker_finds_problems(schema, error):
    assert error in structural_errors(schema)


def test_int_or_string_and_preserve_unknown_need_no_type():
    schema = {"type": "object", "properties": {
        "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        "raw": {"x-kubernetes-preserve-unknown-fields": True},
    }}
    assert structural_errors(schema) == []


def test_crd_object_is_a_valid_customresourcedefinition():
    kubernetes_validate.validate(build_crd(), K8S_VERSION, strict=True)


def test_names_and_version():
    spec = build_crd()["spec"]
    assert build_crd()["metadata"]["name"] == "rewardmodeljobs.rmjob.dev"
    assert (spec["group"], spec["scope"]) == ("rmjob.dev", "Namespaced")
    assert spec["names"]["kind"] == "RewardModelJob"
    assert (spec["names"]["plural"], spec["names"]["shortNames"]) == ("rewardmodeljobs", ["rmj"])
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def _schema_at(schema: dict, json_path: str) -> dict:
    node = schema
    for part in json_path.lstrip(".").split("."):
        node = node["properties"][part]
    return node


@pytest.mark.parametrize("column", build_crd()["spec"]["versions"][0]["additionalPrinterColumns"],
                         ids=lambda c: c["name"])
def test_printer_columns_point_at_fields_of_their_type(column):
    if column["jsonPath"].startswith(".metadata"):
        assert column["type"] == "date"
        return
    node = _schema_at(openapi_schema(), column["jsonPath"])
    assert node["type"] == column["type"]


def test_status_schema():
    status = openapi_schema()["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Suspended"]
    condition = status["conditions"]["items"]
    assert set(condition["properties"]) == {"type", "status", "reason", "message", "lastTransitionTime",
                                            "observedGeneration"}
    assert condition["required"] == ["type", "status"]
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    assert set(status["metrics"]["properties"]) >= {"step", "totalSteps", "epoch", "trainLoss", "trainAccuracy",
                                                    "evalLoss", "evalAccuracy", "evalRewardMargin"}
    assert set(status["hub"]["properties"]) == {"repo", "revision", "commit", "url"}
    assert set(status["workload"]["properties"]) == {"apiVersion", "kind", "name"}
    for free_form in ("training", "kopf"):  # written by the trainer and by kopf
        assert status[free_form]["x-kubernetes-preserve-unknown-fields"] is True


def test_a_status_the_operator_writes_is_valid():
    job = {
        "apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob", "metadata": {"name": "rm"},
        "spec": {"trainer": {"modelNameOrPath": "m", "datasetMixer": {"d": 1.0}}},
        "status": {
            "phase": "Running", "message": "training", "observedGeneration": 1,
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
            "workload": {"apiVersion": "batch/v1", "kind": "Job", "name": "rm"},
            "topology": {"nodes": 2, "gpusPerNode": 8, "worldSize": 16},
            "metrics": {"step": 10, "totalSteps": 100, "episode": 640, "epoch": 0.1, "trainLoss": 0.6,
                        "trainAccuracy": 0.7},
            "hub": {"repo": "org/rm", "revision": "main", "commit": "abc", "url": "https://hf.co/org/rm"},
            "wandb": {"url": "https://wandb.ai/x"},
            "training": {"step": 10, "anything": {"nested": True}},
            "kopf": {"progress": {}},
        },
    }
    assert schema_errors(openapi_schema(), job) == []
    job["status"]["phase"] = "Done"
    assert schema_errors(openapi_schema(), job)


def _nodes(schema: dict, path: str = ""):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")


def test_every_spec_field_is_documented():
    spec = openapi_schema()["properties"]["spec"]
    fields = [(path, node) for path, node in _nodes(spec) if path and not path.endswith("[]")]
    undocumented = [path for path, node in fields if "description" not in node]
    assert undocumented == []


def test_every_cel_rule_compiles():
    env = celpy.Environment()
    rules = [r["rule"] for _, node in _nodes(openapi_schema()) for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 10
    for rule in rules:
        env.compile(rule)


def _defaults_with_rules(schema: dict):
    """``(path, node)`` of every node that has a ``default`` and rules somewhere at or below it."""
    def has_rules(node: dict) -> bool:
        return any("x-kubernetes-validations" in n for _, n in _nodes(node))

    return [(path, node) for path, node in _nodes(schema) if "default" in node and has_rules(node)]


def test_every_rule_holds_on_its_nodes_raw_default():
    """Emulates the API server's check when the CRD is created (apiextensions-apiserver
    ValidateDefaults: each node's rules, and those of the nodes below it, run on the node's raw
    ``default`` with nested defaults not filled in); a rule that fails or cannot evaluate there
    makes ``kubectl apply -f manifests/crd.yaml`` and ``helm install`` fail with 422.
    Also worth running against the real control plane: create the CRD."""
    checked = _defaults_with_rules(committed_schema())
    assert {".spec.deepspeed", ".spec.hub", ".spec.resources"} <= {path for path, _ in checked}
    failures = [(path + where, message) for path, node in checked
                for where, message in cel_errors(node, node["default"])]
    assert failures == []


def test_cel_rules_that_iterate_have_bounded_input():
    # The API server refuses CRDs whose CEL rules it cannot bound in cost.
    spec = openapi_schema()["properties"]["spec"]["properties"]
    assert spec["trainer"]["properties"]["datasetMixer"]["maxProperties"] <= 64
    assert spec["resources"]["properties"]["env"]["maxItems"] <= 256
    # Compared pairwise (unique names and mount paths): lists and strings both bounded.
    volumes, mounts = (spec["resources"]["properties"][name] for name in ("volumes", "volumeMounts"))
    assert volumes["maxItems"] <= 64 and mounts["maxItems"] <= 64
    assert volumes["items"]["properties"]["name"]["maxLength"] <= 63
    assert mounts["items"]["properties"]["name"]["maxLength"] <= 63
    assert mounts["items"]["properties"]["mountPath"]["maxLength"] <= 1024


def test_crd_yaml_has_no_anchors():
    text = CRD_PATH.read_text()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == build_crd()
