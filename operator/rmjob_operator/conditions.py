"""Pure status logic: workload status -> RewardModelJob phase and conditions.

Nothing here talks to Kubernetes; the handlers feed in the objects they read and
patch back what these functions return, so every rule can be tested as a table.

Phases: Pending -> Running -> Succeeded | Failed, plus Suspended (by the user's
``runPolicy.suspend``). A workload that is suspended without the user asking for it
is waiting for Kueue admission and stays Pending.

Conditions follow the Kubernetes API conventions (type, status, reason, message,
lastTransitionTime, observedGeneration): one entry per type, ``lastTransitionTime``
moves only when ``status`` flips.
"""

from __future__ import annotations

import dataclasses
import datetime

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
TERMINAL_PHASES = (SUCCEEDED, FAILED)

# Condition types of the RewardModelJob. The phase ones mirror the workload; the
# last two are about the spec and are owned by the create/update handlers.
CREATED, INVALID_SPEC, SPEC_CHANGE_REFUSED = "Created", "InvalidSpec", "SpecChangeRefused"
# The workload's controller cannot create pods (Pod Security, quota, a missing ServiceAccount
# or PriorityClass): it only says so in Warning events on the workload.
POD_CREATION_FAILED = "PodCreationFailed"
# Reasons of those events: the Job controller's and Kubeflow's training-operator's.
POD_CREATION_FAILED_REASONS = ("FailedCreate", "FailedCreatePod")
PHASE_CONDITIONS = (RUNNING, SUCCEEDED, FAILED, SUSPENDED)


@dataclasses.dataclass(frozen=True)
class WorkloadState:
    """What the workload's own status says, reduced to one of our phases."""

    phase: str
    reason: str
    message: str


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _true_conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}


def pytorchjob_state(status: dict) -> WorkloadState:
    """Kubeflow training-operator conditions: Created, Running, Restarting, Succeeded, Failed, Suspended."""
    true = _true_conditions(status)
    for kind_type, phase in (("Succeeded", SUCCEEDED), ("Failed", FAILED), ("Suspended", SUSPENDED),
                             ("Running", RUNNING), ("Restarting", RUNNING)):
        if kind_type in true:
            cond = true[kind_type]
            return WorkloadState(phase, cond.get("reason") or f"PyTorchJob{kind_type}", cond.get("message") or "")
    return WorkloadState(PENDING, "PyTorchJobCreated", "waiting for the PyTorchJob's pods")


def job_state(status: dict) -> WorkloadState:
    """batch/v1 Job: conditions Complete / Failed / Suspended, else the ready pod count.

    From Kubernetes 1.31 the Job controller first sets ``SuccessCriteriaMet`` or
    ``FailureTarget`` and adds ``Complete`` / ``Failed`` only once every pod has terminated
    (seconds to a grace period later). The outcome is final at the first condition: the API
    server refuses a Job that goes from ``SuccessCriteriaMet`` to ``Failed`` or that carries
    both (KEP-3998, KEP-3329), so the phase is set there, not left Pending meanwhile.

    ``active`` counts pods that are not finished, unschedulable and still-pulling ones
    included; only ``ready`` pods are training.
    """
    true = _true_conditions(status)
    for kind_type, phase in (("Complete", SUCCEEDED), ("SuccessCriteriaMet", SUCCEEDED), ("Failed", FAILED),
                             ("FailureTarget", FAILED), ("Suspended", SUSPENDED)):
        if kind_type in true:
            cond = true[kind_type]
            return WorkloadState(phase, cond.get("reason") or f"Job{kind_type}", cond.get("message") or "")
    if status.get("ready"):
        return WorkloadState(RUNNING, "PodsReady", f"{status['ready']} pod(s) ready")
    if status.get("active"):
        return WorkloadState(PENDING, "PodsNotReady",
                             f"{status['active']} pod(s) created, none ready yet (scheduling or starting)")
    return WorkloadState(PENDING, "JobCreated", "waiting for the Job's pods")


def workload_state(kind: str, status: dict | None) -> WorkloadState:
    reader = {"PyTorchJob": pytorchjob_state, "Job": job_state}[kind]
    return reader(status or {})


def set_condition(conditions: list[dict], type_: str, status: bool, reason: str, message: str,
                  generation: int | None, now: str) -> list[dict]:
    """Return ``conditions`` with ``type_`` upserted; keeps lastTransitionTime unless status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c["type"] == type_), None)
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == value else now,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    if old is None:
        return [*conditions, new]
    return [new if c["type"] == type_ else c for c in conditions]


def derive_phase(state: WorkloadState, user_suspended: bool, queue_name: str | None) -> tuple[str, str, str]:
    """Map the workload state to (phase, reason, message), telling user suspension from Kueue queueing."""
    if state.phase == SUSPENDED and not user_suspended:
        where = f" in Kueue queue {queue_name!r}" if queue_name else ""
        return PENDING, "WaitingForAdmission", f"workload is suspended, waiting for admission{where}"
    return state.phase, state.reason, state.message


def phase_conditions(conditions: list[dict], phase: str, reason: str, message: str,
                     generation: int | None, now: str) -> list[dict]:
    """Set the phase conditions (Running/Succeeded/Failed/Suspended) so exactly the current one is True."""
    for type_ in PHASE_CONDITIONS:
        active = type_ == phase
        if not active and not any(c["type"] == type_ for c in conditions):
            continue  # never add a False condition for a state the job never reached
        conditions = set_condition(
            conditions, type_, active,
            reason if active else f"Not{type_}",
            message if active else f"job is {phase}",
            generation, now,
        )
    return conditions


def workload_status_patch(owner: dict, kind: str, workload_status: dict | None, now: str) -> dict:
    """The ``status`` fields implied by the owner's workload (of ``kind``) reporting ``workload_status``.

    Terminal phases are sticky: a finished job never goes back to Running (``{}``).
    Pass the result through :func:`changed` to skip writes that change nothing.
    """
    status = owner.get("status") or {}
    spec = owner.get("spec") or {}
    run_policy = spec.get("runPolicy") or {}
    generation = status.get("observedGeneration")
    old_phase = status.get("phase")
    if old_phase in TERMINAL_PHASES:
        return {}
    phase, reason, message = derive_phase(
        workload_state(kind, workload_status), bool(run_policy.get("suspend")), run_policy.get("queueName"),
    )
    old_conditions = status.get("conditions") or []
    conditions = phase_conditions(old_conditions, phase, reason, message, generation, now)
    # Running or finished (a short job, or one whose watch events coalesced, is never seen
    # Running): the refusal to create pods no longer holds. Created but not ready pods do not
    # clear it: with several nodes, the quota may have let only some of them in.
    if phase in (RUNNING, *TERMINAL_PHASES) and any(
            c["type"] == POD_CREATION_FAILED and c["status"] == "True" for c in conditions):
        conditions = set_condition(conditions, POD_CREATION_FAILED, False, "PodsCreated", "", generation, now)
    patch: dict = {"phase": phase, "message": message}
    if phase != old_phase and phase in TERMINAL_PHASES:
        patch["completionTime"] = now
    if conditions != old_conditions:
        patch["conditions"] = conditions
    return patch


# The Failed reason of a job whose workload went away before it finished.
WORKLOAD_LOST = "WorkloadLost"


def workload_gone_patch(owner: dict, kind: str, name: str, last_status: dict | None, now: str) -> dict:
    """The ``status`` fields for a job whose workload (``kind`` ``name``) no longer exists.

    ``last_status`` is the workload's status in its deletion event, or None when the workload
    was found missing (deleted while the operator was not watching). A job that finished, or
    that is being deleted itself (foreground deletion removes the children first), is left
    alone: a finished workload removed by its TTL changes nothing. A workload whose last status
    says it finished (removed by its TTL before that change was seen) reports its outcome.
    Anything else was lost mid-run: Failed, reason ``WorkloadLost``; the job is never given a
    new workload, since a second one would train again from the start.
    """
    status = owner.get("status") or {}
    recorded = status.get("workload")
    if owner.get("metadata", {}).get("deletionTimestamp") or status.get("phase") in TERMINAL_PHASES:
        return {}
    if recorded and (recorded.get("kind"), recorded.get("name")) != (kind, name):
        return {}  # not the workload this job runs
    if last_status is not None and workload_state(kind, last_status).phase in TERMINAL_PHASES:
        return workload_status_patch(owner, kind, last_status, now)
    how = "was deleted" if last_status is not None else \
        "is gone (deleted, or finished and removed by its TTL while the operator was not watching)"
    message = f"{kind} {name} {how} before the job finished; create a new RewardModelJob to train again"
    generation = status.get("observedGeneration")
    conditions = phase_conditions(status.get("conditions") or [], FAILED, WORKLOAD_LOST, message, generation, now)
    return {"phase": FAILED, "message": message, "conditions": conditions, "completionTime": now}


def pod_creation_failed_patch(owner: dict, kind: str, message: str, now: str) -> dict:
    """The ``status`` fields for a workload of ``kind`` whose controller reports that it cannot
    create pods (``message``: the event's, e.g. the admission error). A job that is running or
    finished is left alone: a later replacement pod failing does not change its phase."""
    status = owner.get("status") or {}
    if status.get("phase") in (RUNNING, *TERMINAL_PHASES):
        return {}
    text = f"the {kind} cannot create pods: {message}"
    conditions = set_condition(status.get("conditions") or [], POD_CREATION_FAILED, True, "FailedCreate", text,
                               status.get("observedGeneration"), now)
    return {"message": text, "conditions": conditions}


# status.training keys (written by the trainer) that are copied to status.metrics.
METRIC_KEYS = ("step", "totalSteps", "episode", "epoch", "trainLoss", "trainAccuracy",
               "evalLoss", "evalAccuracy", "evalRewardMargin", "benchmarkAccuracy")


def _parse_time(value: object) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None


def progress(training: dict, previous: dict | None) -> dict | None:
    """``status.progress`` from the trainer's report and the one before it (None: no steps yet).

    The time left is the remaining steps at the rate between the two reports; absent (None,
    which a merge patch deletes) on a first report and when the step went back (a run resumed
    from an earlier checkpoint), so no estimate of an earlier attempt lingers.
    """
    step, total = training.get("step"), training.get("totalSteps")
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
        return None
    if training.get("done"):
        return {"percentage": 100, "estimatedRemainingSeconds": 0}
    remaining = None
    previous = previous or {}
    before, then, now = previous.get("step"), _parse_time(previous.get("updateTime")), \
        _parse_time(training.get("updateTime"))
    if isinstance(before, int) and before < step and then and now and now > then:
        remaining = round((total - step) * (now - then).total_seconds() / (step - before))
    return {"percentage": min(step * 100 // total, 100), "estimatedRemainingSeconds": remaining}


EVAL_KEYS = ("evalLoss", "evalAccuracy", "evalRewardMargin")


def evaluation_message(training: dict, previous: dict | None) -> str | None:
    """The Event text for an evaluation the report carries that the previous one did not; None
    when there is none. The trainer repeats the latest evaluation in every later report, so a
    new one shows as new values."""
    if not isinstance(training.get("evalAccuracy"), (int, float)):
        return None
    if previous and all(previous.get(key) == training.get(key) for key in EVAL_KEYS):
        return None
    where = f" (reported at step {training['step']}/{training.get('totalSteps', '?')})" if "step" in training else ""
    loss = f", loss {training['evalLoss']:.4f}" if isinstance(training.get("evalLoss"), (int, float)) else ""
    return f"evaluation accuracy {training['evalAccuracy']:.4f}{loss}{where}"


def training_status(training: dict, previous: dict | None = None) -> dict:
    """The trainer's ``status.training`` report (and the one before it) -> the ``metrics``,
    ``progress``, ``hub`` and ``wandb`` status fields."""
    patch: dict = {"metrics": {k: training[k] for k in METRIC_KEYS if k in training}}
    if (now := progress(training, previous)) is not None:
        patch["progress"] = now
    if training.get("hub"):
        patch["hub"] = dict(training["hub"])
    if training.get("wandbUrl"):
        patch["wandb"] = {"url": training["wandbUrl"]}
    return patch


def changed(status: dict, patch: dict) -> dict:
    """``patch`` without the keys whose value ``status`` already has (so no-op writes are skipped)."""
    return {k: v for k, v in patch.items() if status.get(k) != v}
