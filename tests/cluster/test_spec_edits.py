"""Spec edits of a started job against the real API server and the operator process: the
workload's snapshot holds what the API server stored (CRD defaults included), a real edit is
refused and its revert accepted, and a workload of an operator that kept only a hash adopts
the spec once, with an Event, instead of refusing every edit."""

from __future__ import annotations

import hashlib
import json

import pytest
from operator_harness import namespace_fixture, operator_fixture
from rmj import condition, cpu_spec, get_json, rmj, status_of, wait_until
from rmjob_operator.spec import parse_spec

pytestmark = pytest.mark.cluster


ns = namespace_fixture("module")
operator = operator_fixture("module")


def started(kubectl, ns: str, name: str) -> dict:
    kubectl("apply", "-f", "-", input=json.dumps(rmj(name, ns, cpu_spec(runPolicy={"suspend": True}))))
    wait_until(lambda: status_of(kubectl, ns, name).get("workload"), 60, f"{name}'s workload")
    return get_json(kubectl, "job", name, "-n", ns)


def edit(kubectl, ns: str, name: str, spec: dict) -> None:
    kubectl("patch", "rewardmodeljobs.rmjob.dev", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def refusal(kubectl, ns: str, name: str, status: str) -> dict:
    def reached():
        found = condition(status_of(kubectl, ns, name), "SpecChangeRefused")
        return found if found and found["status"] == status else None

    return wait_until(reached, 60, f"SpecChangeRefused {status}")


def events(kubectl, ns: str, name: str, reason: str) -> list[dict]:
    return get_json(kubectl, "events", "-n", ns, "--field-selector",
                    f"involvedObject.name={name},involvedObject.kind=RewardModelJob,reason={reason}")["items"]


def test_the_snapshot_holds_the_stored_spec_and_a_real_edit_is_refused(kubectl, ns, operator):
    job = started(kubectl, ns, "rm-edit")
    snapshot = json.loads(job["metadata"]["annotations"]["rmjob.dev/spec-snapshot"])
    stored = get_json(kubectl, "rewardmodeljobs.rmjob.dev", "rm-edit", "-n", ns)["spec"]
    # What the API server stored: the CRD's defaults of the fields the job left out included.
    assert snapshot["spec.trainer.loraDropout"] == stored["trainer"]["loraDropout"] == 0
    assert snapshot["spec.trainer.learningRate"] == stored["trainer"]["learningRate"]
    assert "spec.runPolicy.suspend" not in snapshot

    edit(kubectl, ns, "rm-edit", {"trainer": {"learningRate": 1e-3}})
    refused = refusal(kubectl, ns, "rm-edit", "True")
    assert refused["message"].startswith("spec.trainer.learningRate cannot change"), refused
    edit(kubectl, ns, "rm-edit", {"trainer": {"learningRate": stored["trainer"]["learningRate"]},
                                  "runPolicy": {"ttlSecondsAfterFinished": 600}})
    refusal(kubectl, ns, "rm-edit", "False")
    assert get_json(kubectl, "job", "rm-edit", "-n", ns)["spec"]["ttlSecondsAfterFinished"] == 600


def test_a_workload_of_an_operator_that_kept_a_hash_adopts_the_spec_once(kubectl, ns, operator):
    """The hash an earlier operator wrote was computed with its defaults (here: anything that
    is not today's hash), so it matches no spec today; a safe edit must still apply."""
    started(kubectl, ns, "rm-legacy")
    kubectl("annotate", "job", "rm-legacy", "-n", ns, "--overwrite", "rmjob.dev/spec-snapshot-",
            "rmjob.dev/spec-hash=0123456789abcdef")
    edit(kubectl, ns, "rm-legacy", {"runPolicy": {"ttlSecondsAfterFinished": 600}})
    wait_until(lambda: get_json(kubectl, "job", "rm-legacy", "-n", ns)["spec"].get("ttlSecondsAfterFinished") == 600,
               30, "the safe edit applied", interval=1)
    assert condition(status_of(kubectl, ns, "rm-legacy"), "SpecChangeRefused") is None
    adopted = wait_until(lambda: events(kubectl, ns, "rm-legacy", "SpecSnapshotAdopted"), 30, "the Event")
    assert len(adopted) == 1 and "generation 2" in adopted[0]["message"], adopted
    annotations = get_json(kubectl, "job", "rm-legacy", "-n", ns)["metadata"]["annotations"]
    assert "rmjob.dev/spec-hash" not in annotations and "rmjob.dev/spec-snapshot" in annotations

    edit(kubectl, ns, "rm-legacy", {"trainer": {"learningRate": 1e-3}})
    assert refusal(kubectl, ns, "rm-legacy", "True")["message"].startswith("spec.trainer.learningRate")
    assert len(events(kubectl, ns, "rm-legacy", "SpecSnapshotAdopted")) == 1


def test_the_first_edit_of_a_workload_whose_hash_still_matches_is_checked(kubectl, ns, operator):
    """The hash written as an earlier operator did (the values off their defaults, without the
    safe fields) still matches the stored spec: the first edit after the upgrade is judged
    against that spec (kopf's last-handled spec), so a learningRate change is refused."""
    started(kubectl, ns, "rm-hashed")
    stored = get_json(kubectl, "rewardmodeljobs.rmjob.dev", "rm-hashed", "-n", ns)["spec"]
    data = parse_spec(stored).model_dump(by_alias=True, mode="json", exclude_defaults=True)
    run_policy = {k: v for k, v in data.pop("runPolicy", {}).items()
                  if k not in ("suspend", "ttlSecondsAfterFinished", "activeDeadlineSeconds")}
    legacy = hashlib.sha256(json.dumps({**data, "runPolicy": run_policy} if run_policy else data,
                                       sort_keys=True).encode()).hexdigest()[:16]
    kubectl("annotate", "job", "rm-hashed", "-n", ns, "--overwrite", "rmjob.dev/spec-snapshot-",
            f"rmjob.dev/spec-hash={legacy}")
    edit(kubectl, ns, "rm-hashed", {"trainer": {"learningRate": 1e-3}})
    assert refusal(kubectl, ns, "rm-hashed", "True")["message"].startswith("spec.trainer.learningRate")
    annotations = get_json(kubectl, "job", "rm-hashed", "-n", ns)["metadata"]["annotations"]
    assert json.loads(annotations["rmjob.dev/spec-snapshot"])["spec.trainer.learningRate"] == \
        stored["trainer"]["learningRate"]
