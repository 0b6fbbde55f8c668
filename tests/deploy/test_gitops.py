"""The Argo CD health check, run in Lua 5.1 (Argo CD's gopher-lua dialect) on sample jobs."""

from __future__ import annotations

import lupa.lua51
import pytest

from conftest import MANIFESTS

HEALTH_LUA = (MANIFESTS / "gitops" / "argocd-health-rewardmodeljob.lua").read_text()


def to_lua(runtime, value):
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def health(obj: dict) -> tuple[str, str]:
    """Run the check as Argo CD does: the resource as the global ``obj``, a table returned."""
    runtime = lupa.lua51.LuaRuntime()
    runtime.globals().obj = to_lua(runtime, obj)
    result = runtime.execute(HEALTH_LUA)
    return result["status"], result["message"]


def job(status: dict | None = None, generation: int = 1) -> dict:
    obj = {"apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob",
           "metadata": {"name": "rm", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = {"observedGeneration": 1, **status}
    return obj


def condition(type_: str, status: str = "True", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": type_, "message": message}


@pytest.mark.parametrize("obj, expected", [
    (job(), ("Progressing", "waiting for the operator")),
    (job({"phase": "Pending", "message": "created Job rm"}), ("Progressing", "created Job rm")),
    (job({"phase": "Running", "message": "1 pod(s) active", "metrics": {"step": 120, "totalSteps": 400}}),
     ("Progressing", "step 120/400")),
    (job({"phase": "Running", "message": "1 pod(s) active"}), ("Progressing", "1 pod(s) active")),
    (job({"phase": "Succeeded", "message": "Job completed"}), ("Healthy", "Job completed")),
    (job({"phase": "Suspended", "message": "suspended by spec.runPolicy.suspend"}),
     ("Suspended", "suspended by spec.runPolicy.suspend")),
    (job({"phase": "Failed", "message": "BackoffLimitExceeded"}), ("Degraded", "BackoffLimitExceeded")),
    (job({"phase": "Failed", "message": "spec.trainer.learningRate: must be > 0",
          "conditions": [condition("InvalidSpec", message="spec.trainer.learningRate: must be > 0")]}),
     ("Degraded", "InvalidSpec: spec.trainer.learningRate: must be > 0")),
    # A fixed spec: the InvalidSpec condition stays, False.
    (job({"phase": "Running", "conditions": [condition("InvalidSpec", "False"), condition("Running")]}),
     ("Progressing", "")),
    # An edit the operator refused: its observedGeneration stays behind, it is still Degraded.
    (job({"phase": "Running", "conditions": [condition("SpecChangeRefused", message="spec.trainer.seed cannot change")]},
         generation=2),
     ("Degraded", "SpecChangeRefused: spec.trainer.seed cannot change")),
    (job({"phase": "Succeeded"}, generation=2), ("Progressing", "waiting for the operator to observe generation 2")),
    (job({"phase": "Exploded"}), ("Unknown", "unknown phase Exploded")),
])
def test_health(obj, expected):
    assert health(obj) == expected


def test_readme_names_the_argocd_key():
    readme = (MANIFESTS / "gitops" / "README.md").read_text()
    assert "resource.customizations.health.rmjob.dev_RewardModelJob" in readme
