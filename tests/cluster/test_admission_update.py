"""The chart's ValidatingAdmissionPolicy judges an UPDATE only on what it changes, against the
real API server: a job it admitted keeps taking metadata writes (labels, finalizers: a
controller's finalizer removal must never be refused) after the policy is tightened, while a
spec change that breaks the policy is still refused."""

from __future__ import annotations

import json
import uuid

import pytest
from operator_harness import helm_template, new_namespace
from rmj import cpu_spec, get_or_none, rmj, wait_until

pytestmark = pytest.mark.cluster

HOLD = "test.rmjob.dev/hold"


@pytest.fixture
def ns(kubectl, rmj_crd):
    name = new_namespace(kubectl)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def policy_objects(release: str, ns: str, *allowed: str) -> list[dict]:
    """The chart's policy and binding, the binding confined to ``ns`` (the cluster is shared)."""
    values = [f"watchNamespaces={{{ns}}}", "trainerServiceAccount.create=false"]
    if allowed:
        values.append(f"admissionPolicy.allowedServiceAccounts={{{','.join(allowed)}}}")
    objects = [o for o in helm_template(release, ns, *values)
               if o["kind"] in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")]
    assert len(objects) == 2, objects
    return objects


def apply_objects(kubectl, objects: list[dict]) -> None:
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def refused(kubectl, ns: str, name: str, spec: dict) -> str | None:
    result = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(rmj(name, ns, spec)), check=False)
    return result.stderr if result.returncode else None


def test_a_job_the_tightened_policy_would_refuse_still_takes_metadata_writes(kubectl, ns):
    release = f"adm-{uuid.uuid4().hex[:6]}"
    shared = cpu_spec(resources={"gpusPerNode": 0, "serviceAccountName": "shared"})
    objects = policy_objects(release, ns, "shared")
    apply_objects(kubectl, objects)
    try:
        # In force once a job naming an account off the list is refused.
        wait_until(lambda: refused(kubectl, ns, "rm-probe", cpu_spec(resources={
            "gpusPerNode": 0, "serviceAccountName": "other"})), 30, "the policy in force")
        job = rmj("rm-adm", ns, shared)
        job["metadata"]["finalizers"] = [HOLD]
        kubectl("create", "-f", "-", input=json.dumps(job))

        apply_objects(kubectl, policy_objects(release, ns))  # "shared" is no longer allowed
        message = wait_until(lambda: refused(kubectl, ns, "rm-probe", shared), 30, "the tightened policy in force")
        assert "serviceAccountName must be the job's own NAME-trainer account" in message, message

        kubectl("label", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "team=a")
        kubectl("annotate", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "note=kept")
        # An edit of a field the policy does not judge.
        kubectl("patch", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "--type=merge",
                "-p", json.dumps({"spec": {"trainer": {"learningRate": 1e-5}}}))

        # Spec changes that break the policy are still refused.
        for change in ({"resources": {"serviceAccountName": "other"}},
                       {"resources": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}):
            result = kubectl("patch", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "--type=merge",
                             "-p", json.dumps({"spec": change}), check=False)
            assert result.returncode != 0 and "Forbidden" in result.stderr, (change, result.stderr)
        # Moving to an account the policy allows is fine.
        own = kubectl("patch", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "--type=merge",
                      "--dry-run=server", "-p", json.dumps({"spec": {"resources": {
                          "serviceAccountName": "rm-adm-trainer"}}}), check=False)
        assert own.returncode == 0, own.stderr

        # Deleting waits for the finalizer; the controller that holds it removes it: an UPDATE.
        kubectl("delete", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "--wait=false")
        kubectl("patch", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "--type=json",
                "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]))
        wait_until(lambda: get_or_none(kubectl, "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns) is None,
                   30, "the job gone")
    finally:
        for obj in objects:
            kubectl("delete", obj["kind"], obj["metadata"]["name"], "--ignore-not-found", "--wait=false", check=False)
        # Without the policy, so that a failed run never leaves a namespace that cannot go.
        kubectl("patch", "rewardmodeljobs.rmjob.dev", "rm-adm", "-n", ns, "--type=json",
                "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]), check=False)
