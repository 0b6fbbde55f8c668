"""What the API server does with a custom resource, for tests: default, validate, run CEL.

- :func:`apply_defaults`: structural defaulting (``default`` of absent fields, recursively);
- :func:`schema_errors`: OpenAPI v3.0 validation (JSON Schema draft 4: boolean
  ``exclusiveMinimum``), with unknown fields rejected as under kubectl's default
  ``--validate=strict``;
- :func:`cel_errors`: every ``x-kubernetes-validations`` rule, evaluated with cel-python on
  the defaulted object, values typed by the schema as Kubernetes does (``number`` is a double).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import re2
import yaml
from celpy import celtypes
from jsonschema import ValidationError

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "manifests" / "crd.yaml"
CHART_CRD_PATH = REPO / "charts" / "rmjob-operator" / "crds" / "rewardmodeljobs.yaml"


def committed_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    value = copy.deepcopy(value)
    _default(schema, value)
    return value


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                _default(child, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                _default(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        stack.extend(node.get("properties", {}).values())
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                stack.append(node[key])
    return schema


def _re2_pattern(validator, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    """The API server matches `pattern` with Go's regexp (RE2), as CEL's matches() does: its
    `$` is the end of the text, where Python's also matches before a final line break."""
    if validator.is_type(instance, "string") and not re2.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_KubeValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"pattern": _re2_pattern})


def schema_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    validator = _KubeValidator(_strict(schema))
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(obj)]


@functools.cache
def _program(rule: str):
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _to_cel(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return celtypes.MapType({
            celtypes.StringType(k): _to_cel(props.get(k, extra), v) for k, v in value.items()
        })
    if isinstance(value, list):
        return celtypes.ListType([_to_cel(schema.get("items", {}), v) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if schema.get("type") == "number" and isinstance(value, (int, float)):
        return celtypes.DoubleType(float(value))
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    return celtypes.StringType(value)


def rule_evaluations(schema: dict[str, Any], obj: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any], bool]]:
    """``(node path, rule, passed)`` for every rule of every node present in ``obj``, as the API
    server's CEL validator walks it; a rule that cannot evaluate counts as failed, as there."""
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            result = _program(rule["rule"]).evaluate({"self": _to_cel(schema, obj)})
        except celpy.CELEvalError:
            result = False
        yield path, rule, not isinstance(result, Exception) and bool(result)
    if isinstance(obj, dict):
        for name, child in schema.get("properties", {}).items():
            if name in obj:
                yield from rule_evaluations(child, obj[name], f"{path}.{name}")
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            yield from rule_evaluations(schema["items"], item, f"{path}[{i}]")


def cel_errors(schema: dict[str, Any], obj: Any) -> list[tuple[str, str]]:
    """``(path, message)`` of each failing rule; ``obj`` should already be defaulted."""
    return [(path + rule.get("fieldPath", ""), rule["message"])
            for path, rule, passed in rule_evaluations(schema, obj) if not passed]


def admission_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Everything the API server would reject ``obj`` for: schema first, then CEL."""
    defaulted = apply_defaults(schema, obj)
    errors = schema_errors(schema, defaulted)
    if errors:  # the API server also stops before CEL when the schema fails
        return errors
    return [f"{path}: {message}" for path, message in cel_errors(schema, defaulted)]
