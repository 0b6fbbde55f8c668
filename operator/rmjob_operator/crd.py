"""The RewardModelJob CRD, generated from the pydantic models in :mod:`rmjob_operator.spec`.

``python -m rmjob_operator.crd`` prints the CRD as YAML (``make crd`` writes it to
manifests/crd.yaml and the Helm chart); ``--markdown`` prints docs/spec-reference.md.
Tests check that the committed files match what this module generates.

pydantic's JSON Schema is not yet what Kubernetes accepts: the API server wants a
*structural* schema (a ``type`` on every node, no ``$ref``, no ``anyOf`` except for
int-or-string, no ``additionalProperties`` next to ``properties``). :func:`structural`
does that conversion; :func:`structural_errors` checks the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

import yaml

from rmjob_operator import API_VERSION, GROUP, KIND, PLURAL, VERSION
from rmjob_operator.spec import NAME_MESSAGE, NAME_RULE_CEL, RewardModelJobSpec, RewardModelJobStatus

SINGULAR = "rewardmodeljob"
SHORT_NAMES = ["rmj"]
CATEGORIES = ["rmjob"]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.trainer.modelNameOrPath"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
    {"name": "GPUs/Node", "type": "integer", "jsonPath": ".spec.resources.gpusPerNode"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.metrics.step"},
    {"name": "Total", "type": "integer", "jsonPath": ".status.metrics.totalSteps", "priority": 1},
    {"name": "Progress", "type": "integer", "description": "Percent of the optimizer steps done.",
     "jsonPath": ".status.progress.percentage"},
    {"name": "ETA(s)", "type": "integer", "description": "Estimated seconds of training left.",
     "jsonPath": ".status.progress.estimatedRemainingSeconds", "priority": 1},
    {"name": "Eval Acc", "type": "number", "jsonPath": ".status.metrics.evalAccuracy"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROPPED_KEYS = {"title", "$defs"}
# Keys in the order a reader wants them; anything else (x-kubernetes-*) follows.
_KEY_ORDER = ["description", "type", "format", "enum", "default", "minimum", "exclusiveMinimum",
              "minLength", "pattern", "minItems", "maxItems", "minProperties", "maxProperties",
              "anyOf", "items", "additionalProperties", "properties", "required"]


# --- pydantic JSON Schema -> structural schema ------------------------------------------


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a ``$ref``; the referring node's keys (description, default) win."""
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    return {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}


def _drop_null(node: dict[str, Any]) -> dict[str, Any]:
    """``Optional[X]`` is ``anyOf: [X, {type: null}]``: an optional field is simply not required."""
    options = node.get("anyOf")
    if options and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        node = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**rest[0], **node} if len(rest) == 1 else {**node, "anyOf": rest}
    if "default" in node and node["default"] is None:
        del node["default"]
    return node


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(_drop_null(_resolve(node, defs)), defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "description":
            out[key] = value.replace("``", "")
        elif key == "properties":
            out[key] = {name: _convert(child, defs) for name, child in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            if value is True:
                # pydantic's dict[str, Any] or extra="allow": keep whatever the user wrote.
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _convert(value, defs)
            # False is pydantic's extra="forbid"; the API server prunes (or, with kubectl's
            # default strict field validation, rejects) unknown fields of structural schemas.
        elif key == "anyOf":
            out[key] = [_convert(option, defs) for option in value]
        elif key == "exclusiveMinimum":
            # JSON Schema's number is OpenAPI v3.0's minimum + boolean flag.
            out.update(minimum=value, exclusiveMinimum=True)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if out.get("properties") == {}:
        del out["properties"]
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    return dict(sorted(out.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def structural(model_schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic ``model_json_schema(by_alias=True)`` -> structural OpenAPI v3 schema."""
    return _convert(model_schema, model_schema.get("$defs", {}))


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def structural_errors(schema: dict[str, Any]) -> list[str]:
    """What makes ``schema`` non-structural (empty when the API server would accept it)."""
    errors = []
    for path, node in _walk(schema, ""):
        path = path or "<root>"
        int_or_string = node.get("x-kubernetes-int-or-string", False)
        if "type" not in node and not int_or_string and not node.get("x-kubernetes-preserve-unknown-fields"):
            errors.append(f"{path}: no type")
        for key in ("$ref", "allOf", "oneOf", "not", "nullable", "definitions", "$defs"):
            if key in node:
                errors.append(f"{path}: {key} is not allowed")
        if "anyOf" in node and not (
            int_or_string and all(set(o) == {"type"} and o["type"] in ("integer", "string") for o in node["anyOf"])
        ):
            errors.append(f"{path}: anyOf is only allowed for int-or-string")
        if "additionalProperties" in node:
            if not isinstance(node["additionalProperties"], dict):
                errors.append(f"{path}: additionalProperties must be a schema")
            if "properties" in node:
                errors.append(f"{path}: additionalProperties and properties are mutually exclusive")
        if "items" in node and not isinstance(node["items"], dict):
            errors.append(f"{path}: items must be one schema")
        if node.get("type") == "array" and "items" not in node:
            errors.append(f"{path}: array without items")
    return errors


# --- the CRD ------------------------------------------------------------------------------


def spec_schema() -> dict[str, Any]:
    return structural(RewardModelJobSpec.model_json_schema(by_alias=True))


def status_schema() -> dict[str, Any]:
    return structural(RewardModelJobStatus.model_json_schema(by_alias=True))


def openapi_schema() -> dict[str, Any]:
    return {
        "description": "RewardModelJob trains a Bradley-Terry reward model with rmjob-train "
        "on one or more GPU nodes.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [{"rule": NAME_RULE_CEL, "message": f"metadata.name {NAME_MESSAGE}"}],
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "rmjob", "app.kubernetes.io/part-of": "rmjob"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors for shared sub-schemas
        return True


def crd_yaml() -> str:
    header = "# Generated by `make crd` (python -m rmjob_operator.crd) from operator/rmjob_operator/spec.py.\n"
    body = yaml.dump(build_crd(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return header + "---\n" + body


# --- docs/spec-reference.md ------------------------------------------------------------------


def _type_text(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = node.get("type", "object")
    if kind == "array":
        return f"list of {_type_text(node['items'])}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type_text(node['additionalProperties'])}"
    return kind


def _constraints_text(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    if "minimum" in node:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {node['minimum']}")
    for key, sign in (("minItems", "items >="),
                      ("maxItems", "items <="), ("minProperties", "entries >="), ("maxProperties", "entries <=")):
        if key in node:
            parts.append(f"{sign} {node[key]}")
    return "; ".join(parts)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _reference_rows(node: dict[str, Any], path: str, required: bool) -> Iterator[str]:
    default = f"`{json.dumps(node['default'])}`" if node.get("default", {}) != {} else ""
    yield (f"| `{path}` | {_type_text(node)}{' (required)' if required else ''} | {default} | "
           f"{_cell(_constraints_text(node))} | {_cell(node.get('description', ''))} |")
    for name, child in node.get("properties", {}).items():
        yield from _reference_rows(child, f"{path}.{name}", name in node.get("required", []))
    if node.get("type") == "array" and node["items"].get("properties"):
        yield from _reference_rows(node["items"], f"{path}[]", False)


def _rules(node: dict[str, Any], path: str) -> Iterator[str]:
    for rule in node.get("x-kubernetes-validations", []):
        where = (path + rule.get("fieldPath", "")).lstrip(".") or "metadata"
        yield f"- `{where}`: {rule['message']}"
    for name, child in node.get("properties", {}).items():
        yield from _rules(child, f"{path}.{name}")


def reference_markdown() -> str:
    """docs/spec-reference.md: every spec field with its type, default, bounds and meaning."""
    schema = openapi_schema()
    spec = schema["properties"]["spec"]
    lines = [
        "# RewardModelJob spec reference",
        "",
        "<!-- Generated by `make crd` (python -m rmjob_operator.crd --markdown); do not edit. -->",
        "",
        f"`apiVersion: {API_VERSION}`, `kind: {KIND}` (short name `{SHORT_NAMES[0]}`). "
        "The `trainer` section has one field per `rmjob-train` flag, camelCase "
        "(`--learning_rate` is `learningRate`); see `rmjob-train --help`.",
        "",
        "| Field | Type | Default | Constraints | Description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, child in spec["properties"].items():
        lines.extend(_reference_rows(child, f"spec.{name}", name in spec.get("required", [])))
    lines += ["", "## Cross-field rules", "",
              "Checked by the API server (CEL) and again by the operator.", ""]
    lines.extend(_rules(schema, ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmjob_operator.crd", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the spec reference instead of the CRD")
    args = parser.parse_args(argv)
    sys.stdout.write(reference_markdown() if args.markdown else crd_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
