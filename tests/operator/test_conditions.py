"""conditions.py as tables: workload status -> phase, and the condition bookkeeping rules."""

from __future__ import annotations

import pytest

from rmjob_operator import conditions as cond

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"


def kf(*types: str) -> dict:
    return {"conditions": [{"type": t, "status": "True", "reason": f"R{t}", "message": t} for t in types]}


@pytest.mark.parametrize(("status", "phase"), [
    ({}, "Pending"),
    (kf("Created"), "Pending"),
    (kf("Created", "Running"), "Running"),
    (kf("Created", "Restarting"), "Running"),
    (kf("Created", "Running", "Suspended"), "Suspended"),
    (kf("Created", "Running", "Succeeded"), "Succeeded"),
    (kf("Created", "Failed"), "Failed"),
    ({"conditions": [{"type": "Running", "status": "False"}]}, "Pending"),
])
def test_pytorchjob_state(status: dict, phase: str) -> None:
    assert cond.workload_state("PyTorchJob", status).phase == phase


@pytest.mark.parametrize(("status", "phase"), [
    (None, "Pending"),
    ({"active": 0}, "Pending"),
    ({"active": 3, "ready": 0}, "Pending"),  # created, but unschedulable or still starting
    ({"active": 3, "ready": 3}, "Running"),
    (kf("Suspended"), "Suspended"),
    ({"active": 1, **kf("Complete")}, "Succeeded"),
    (kf("Failed"), "Failed"),
])
def test_job_state(status: dict | None, phase: str) -> None:
    assert cond.workload_state("Job", status).phase == phase


def test_transition_time_moves_only_when_status_flips() -> None:
    conditions = cond.set_condition([], "Running", True, "R", "m", 1, T0)
    same = cond.set_condition(conditions, "Running", True, "R2", "m2", 2, T1)
    assert same == [{"type": "Running", "status": "True", "reason": "R2", "message": "m2",
                     "lastTransitionTime": T0, "observedGeneration": 2}]
    flipped = cond.set_condition(same, "Running", False, "Done", "", 2, T1)
    assert flipped[0]["lastTransitionTime"] == T1 and flipped[0]["status"] == "False"


def owner(phase: str | None = None, conditions: list | None = None, **run_policy: object) -> dict:
    return {"spec": {"runPolicy": run_policy},
            "status": {"phase": phase, "conditions": conditions or [], "observedGeneration": 3}}


def test_running_then_succeeded() -> None:
    running = cond.workload_status_patch(owner("Pending"), "Job", {"active": 2, "ready": 2}, T0)
    assert running["phase"] == "Running" and running["message"] == "2 pod(s) ready"
    assert running["conditions"][0]["observedGeneration"] == 3
    done = cond.workload_status_patch(owner("Running", running["conditions"]), "Job", kf("Complete"), T1)
    assert done["phase"] == "Succeeded" and done["completionTime"] == T1
    by_type = {c["type"]: c["status"] for c in done["conditions"]}
    assert by_type == {"Running": "False", "Succeeded": "True"}  # no False entries for unreached states


def test_terminal_phase_is_sticky() -> None:
    assert cond.workload_status_patch(owner("Succeeded"), "Job", {"active": 1}, T0) == {}


def test_suspension_the_user_did_not_ask_for_is_queueing() -> None:
    queued = cond.workload_status_patch(owner("Pending", queueName="gpus"), "Job", kf("Suspended"), T0)
    assert queued["phase"] == "Pending" and "gpus" in queued["message"]
    suspended = cond.workload_status_patch(owner("Running", suspend=True), "Job", kf("Suspended"), T0)
    assert suspended["phase"] == "Suspended"


def test_changed_drops_no_op_keys() -> None:
    assert cond.changed({"phase": "Running", "message": "a"}, {"phase": "Running", "message": "b"}) == {"message": "b"}


def test_training_status_copies_metrics_hub_and_wandb() -> None:
    training = {"step": 1, "trainLoss": 0.5, "hub": {"repo": "o/r"}, "wandbUrl": "https://w", "done": True,
                "updateTime": T0}
    assert cond.training_status(training) == {
        "metrics": {"step": 1, "trainLoss": 0.5}, "hub": {"repo": "o/r"}, "wandb": {"url": "https://w"},
    }


def job_conditions(*types: str, **counts: int) -> dict:
    return {**counts, "conditions": [{"type": t, "status": "True", "reason": f"R{t}", "message": t} for t in types]}


@pytest.mark.parametrize(("status", "phase"), [
    # Kubernetes >= 1.31: the outcome is known while pods still terminate (as a real cluster
    # reported them, see tests/cluster); Complete / Failed come only after the last pod is gone.
    (job_conditions("SuccessCriteriaMet", succeeded=2, ready=0, terminating=0), "Succeeded"),
    (job_conditions("FailureTarget", ready=0, terminating=1), "Failed"),
    (job_conditions("FailureTarget", failed=1, ready=0, terminating=0), "Failed"),
    (job_conditions("SuccessCriteriaMet", "Complete", succeeded=2), "Succeeded"),
    (job_conditions("FailureTarget", "Failed", failed=1), "Failed"),
])
def test_job_outcome_before_pods_terminate(status: dict, phase: str) -> None:
    assert cond.workload_state("Job", status).phase == phase


def test_finished_job_without_seen_running_clears_pod_creation_failed() -> None:
    job = owner("Pending")
    job["status"].update(cond.pod_creation_failed_patch(job, "Job", "exceeded quota", T0))
    job["status"].update(cond.workload_status_patch(job, "Job", {"active": 1, "ready": 0}, T0))
    pending = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert pending["PodCreationFailed"] == "True"  # created is not ready: some pods may still be refused
    done = cond.workload_status_patch(job, "Job", job_conditions("SuccessCriteriaMet", succeeded=1), T1)
    by_type = {c["type"]: c["status"] for c in done["conditions"]}
    assert done["phase"] == "Succeeded"
    assert by_type == {"PodCreationFailed": "False", "Succeeded": "True"}


def running_job(phase: str = "Running", **metadata: object) -> dict:
    job = owner(phase, [{"type": "Running", "status": "True", "reason": "PodsReady", "message": "",
                         "lastTransitionTime": T0}])
    job["status"]["workload"] = {"apiVersion": "batch/v1", "kind": "Job", "name": "rm"}
    job["metadata"] = dict(metadata)
    return job


@pytest.mark.parametrize("last_status", [{"active": 2, "ready": 2}, {}, None])
def test_a_workload_gone_before_it_finished_fails_the_job_as_lost(last_status: dict | None) -> None:
    patch = cond.workload_gone_patch(running_job(), "Job", "rm", last_status, T1)
    assert patch["phase"] == "Failed" and patch["completionTime"] == T1
    by_type = {c["type"]: (c["status"], c["reason"]) for c in patch["conditions"]}
    assert by_type == {"Running": ("False", "NotRunning"), "Failed": ("True", "WorkloadLost")}
    assert patch["message"].startswith("Job rm ")
    assert ("was deleted" in patch["message"]) == (last_status is not None)


@pytest.mark.parametrize("phase", ["Pending", "Suspended"])
def test_a_job_that_never_ran_is_lost_too(phase: str) -> None:
    assert cond.workload_gone_patch(running_job(phase), "Job", "rm", {}, T1)["phase"] == "Failed"


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_job_keeps_its_outcome_when_its_workload_goes(phase: str) -> None:
    """The TTL controller removes a finished workload: nothing changes, nothing runs again."""
    assert cond.workload_gone_patch(running_job(phase), "Job", "rm", job_conditions("Complete"), T1) == {}
    assert cond.workload_gone_patch(running_job(phase), "Job", "rm", None, T1) == {}


@pytest.mark.parametrize(("last", "phase", "reason"), [
    (job_conditions("Complete", succeeded=1), "Succeeded", "RComplete"),
    (job_conditions("FailureTarget", "Failed", failed=1), "Failed", "RFailed"),
])
def test_a_workload_removed_before_its_outcome_was_seen_reports_the_outcome(last: dict, phase: str,
                                                                           reason: str) -> None:
    """ttlSecondsAfterFinished: 0 deletes the Job as it finishes; the watch may deliver only the
    deletion, whose object holds the final status."""
    patch = cond.workload_gone_patch(running_job(), "Job", "rm", last, T1)
    assert patch["phase"] == phase
    assert next(c for c in patch["conditions"] if c["type"] == phase)["reason"] == reason


def test_a_job_being_deleted_or_another_workload_is_left_alone() -> None:
    assert cond.workload_gone_patch(running_job(deletionTimestamp=T1), "Job", "rm", {}, T1) == {}
    assert cond.workload_gone_patch(running_job(), "PyTorchJob", "rm", {}, T1) == {}
    assert cond.workload_gone_patch(running_job(), "Job", "other", {}, T1) == {}
