"""The real operator (kopf + handlers.py) against KMock: creation, progress, updates, deletion."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import pathlib
import shutil

import attrs
import kmock
import pytest
import yaml
from kmock_cluster import (
    CONFIGMAPS, JOBS, NAMESPACE, PYTORCHJOBS, REPO, RMJ, Cluster, api, collect_garbage, condition,
    crash_after_workload_created, emulated_cluster, new_job, phase_is, rmj, rmj_path, running_operator, wait_for,
)
from kmock._internal.k8s import KubernetesError
from pydantic import Field, create_model

from rmjob_operator import conditions as cond_module
from rmjob_operator import handlers, render
from rmjob_operator import spec as spec_module

EXAMPLES = REPO / "manifests" / "examples"

PTJ_STATUS = f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs/rm-test/status"
PTJ = f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs/rm-test"
JOB_STATUS = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test/status"


def kubeflow_condition(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason or f"PyTorchJob{type_}", "message": message}


async def started(cluster: Cluster, body: dict, workload: str) -> dict:
    """Create the job and wait until kopf has finished its creation handlers."""
    await api(cluster, "post", rmj_path(), body)
    await wait_for(lambda: rmj(cluster).get("status", {}).get("kopf", {}).get("lastHandledSpec"),
                   message="creation handled")
    return await wait_for(lambda: cluster.get(workload, "rm-test"), message="the workload")


async def test_job_backend_creates_owned_children(cluster: Cluster, operator: asyncio.Task) -> None:
    await started(cluster, new_job(), JOBS)
    job = rmj(cluster)
    owned = [obj for obj in cluster.objects.values() if not obj.deleted
             if any(ref["uid"] == job["metadata"]["uid"] for ref in obj.get("metadata", {}).get("ownerReferences", []))]
    kinds = sorted(obj["kind"] for obj in owned)
    assert kinds == ["ConfigMap", "Job", "Role", "RoleBinding", "Service", "ServiceAccount"]
    for obj in owned:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["kind"] == "RewardModelJob" and ref["name"] == "rm-test" and ref["controller"] is True
    assert cluster.get(CONFIGMAPS, "rm-test-config") is not None
    status = job["status"]
    assert status["workload"] == {"apiVersion": "batch/v1", "kind": "Job", "name": "rm-test"}
    assert status["topology"] == {"nodes": 2, "gpusPerNode": 4, "worldSize": 8}
    assert status["observedGeneration"] == 1 and status["startTime"]
    assert condition(job, "Created")["status"] == "True"
    await wait_for(lambda: cluster.events_for("rm-test"), message="an event")
    assert [e["reason"] for e in cluster.events_for("rm-test")] == ["Pending"]
    assert job["status"]["phase"] == "Pending"
    assert "kopf.zalando.org" not in str(job["metadata"])  # kopf's state lives in status (no GitOps drift)


async def test_auto_backend_picks_pytorchjob_when_its_crd_is_served(with_pytorchjob_crd: Cluster,
                                                                   operator: asyncio.Task) -> None:
    cluster = with_pytorchjob_crd
    workload = await started(cluster, new_job(), PYTORCHJOBS)
    assert workload["metadata"]["ownerReferences"][0]["name"] == "rm-test"
    assert cluster.get(JOBS, "rm-test") is None
    assert rmj(cluster)["status"]["workload"]["kind"] == "PyTorchJob"


async def test_pytorchjob_progress_drives_phase_conditions_and_events(with_pytorchjob_crd: Cluster,
                                                                     operator: asyncio.Task) -> None:
    cluster = with_pytorchjob_crd
    await started(cluster, new_job(), PYTORCHJOBS)
    created = kubeflow_condition("Created")
    running = kubeflow_condition("Running", message="PyTorchJob rm-test is running.")
    await api(cluster, "patch", PTJ_STATUS, {"status": {"conditions": [created, running]}})
    await wait_for(phase_is(cluster, "Running"))
    assert condition(rmj(cluster), "Running")["message"] == "PyTorchJob rm-test is running."

    done = [created, {**running, "status": "False"}, kubeflow_condition("Succeeded")]
    await api(cluster, "patch", PTJ_STATUS, {"status": {"conditions": done}})
    await wait_for(phase_is(cluster, "Succeeded"))
    job = rmj(cluster)
    assert condition(job, "Succeeded")["status"] == "True"
    assert condition(job, "Running")["status"] == "False"
    assert condition(job, "Succeeded")["observedGeneration"] == 1
    assert job["status"]["completionTime"]
    await wait_for(lambda: len(cluster.events_for("rm-test")) == 3)
    assert [e["reason"] for e in cluster.events_for("rm-test")] == ["Pending", "Running", "Succeeded"]


async def test_job_failure_is_reported_with_the_job_controllers_reason(cluster: Cluster,
                                                                       operator: asyncio.Task) -> None:
    await started(cluster, new_job(), JOBS)
    await api(cluster, "patch", JOB_STATUS, {"status": {"active": 2, "ready": 2}})
    await wait_for(phase_is(cluster, "Running"))
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit"}
    await api(cluster, "patch", JOB_STATUS, {"status": {"active": 0, "ready": 0, "failed": 1, "conditions": [failed]}})
    await wait_for(phase_is(cluster, "Failed"))
    assert condition(rmj(cluster), "Failed")["reason"] == "BackoffLimitExceeded"
    await wait_for(lambda: any(e["type"] == "Warning" and e["reason"] == "Failed"
                               for e in cluster.events_for("rm-test")))
    # A finished job stays finished whatever the workload does next.
    await api(cluster, "patch", JOB_STATUS, {"status": {"active": 1, "ready": 1}})
    await asyncio.sleep(0.5)
    assert rmj(cluster)["status"]["phase"] == "Failed"


async def test_restart_mid_reconcile_leaves_exactly_one_workload(cluster: Cluster) -> None:
    """Kill the operator after it created the workload but before it recorded it, then restart."""
    await crash_after_workload_created(lambda: api(cluster, "post", rmj_path(), new_job()))
    first = cluster.get(JOBS, "rm-test")
    assert "workload" not in rmj(cluster).get("status", {})

    async with running_operator():
        await wait_for(lambda: rmj(cluster).get("status", {}).get("workload"), message="status.workload")
        await wait_for(phase_is(cluster, "Pending"))
    assert [j["metadata"]["uid"] for j in cluster.live(JOBS)] == [first["metadata"]["uid"]]
    assert len(cluster.live(CONFIGMAPS)) == 1


async def test_suspend_and_resume_go_to_the_workload(with_pytorchjob_crd: Cluster, operator: asyncio.Task) -> None:
    cluster = with_pytorchjob_crd
    await started(cluster, new_job(), PYTORCHJOBS)
    await api(cluster, "patch", PTJ_STATUS, {"status": {"conditions": [kubeflow_condition("Running")]}})
    await wait_for(phase_is(cluster, "Running"))

    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"runPolicy": {"suspend": True}}})
    await wait_for(lambda: cluster.get(PYTORCHJOBS, "rm-test")["spec"]["runPolicy"]["suspend"] is True)
    suspended = [kubeflow_condition("Running", "False"), kubeflow_condition("Suspended")]
    await api(cluster, "patch", PTJ_STATUS, {"status": {"conditions": suspended}})  # training-operator's answer
    await wait_for(phase_is(cluster, "Suspended"))
    assert rmj(cluster)["status"]["observedGeneration"] == 2

    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"runPolicy": {"suspend": False}}})
    await wait_for(lambda: cluster.get(PYTORCHJOBS, "rm-test")["spec"]["runPolicy"]["suspend"] is False)
    resumed = [kubeflow_condition("Running"), kubeflow_condition("Suspended", "False")]
    await api(cluster, "patch", PTJ_STATUS, {"status": {"conditions": resumed}})
    await wait_for(phase_is(cluster, "Running"))
    reasons = [e["reason"] for e in cluster.events_for("rm-test")]
    assert reasons.count("SpecApplied") == 2 and "Suspended" in reasons


async def test_kueue_suspension_reads_as_pending_not_suspended(cluster: Cluster, operator: asyncio.Task) -> None:
    body = new_job(runPolicy={"queueName": "gpu-queue", "backend": "job"})
    job = await started(cluster, body, JOBS)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    queued = {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended"}
    await api(cluster, "patch", JOB_STATUS, {"status": {"conditions": [queued]}})
    await wait_for(lambda: condition(rmj(cluster), "Suspended") is None
                   and "gpu-queue" in rmj(cluster)["status"]["message"])
    assert rmj(cluster)["status"]["phase"] == "Pending"
    admitted = {**queued, "status": "False", "reason": "JobResumed"}
    await api(cluster, "patch", JOB_STATUS, {"status": {"conditions": [admitted], "active": 2, "ready": 2}})
    await wait_for(phase_is(cluster, "Running"))


async def test_trainer_spec_change_of_a_started_job_is_refused(cluster: Cluster, operator: asyncio.Task) -> None:
    workload = await started(cluster, new_job(), JOBS)
    config = cluster.get(CONFIGMAPS, "rm-test-config")
    trainer = new_job()["spec"]["trainer"]

    # An unsafe change bundled with a safe one: neither is applied (no half-way updates).
    edit = {"spec": {"trainer": {**trainer, "learningRate": 1e-5}, "runPolicy": {"suspend": True}}}
    await api(cluster, "patch", rmj_path("rm-test"), edit)
    refused = await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    assert refused["status"] == "True"
    assert "spec.trainer.learningRate" in refused["message"] and "spec.runPolicy.suspend" in refused["message"]
    assert cluster.get(JOBS, "rm-test")["metadata"]["resourceVersion"] == workload["metadata"]["resourceVersion"]
    assert cluster.get(CONFIGMAPS, "rm-test-config") == config
    assert rmj(cluster)["status"]["observedGeneration"] == 1
    await wait_for(lambda: any(e["reason"] == "SpecChangeRefused" and e["type"] == "Warning"
                               for e in cluster.events_for("rm-test")))

    # Reverting the trainer change makes the spec match the workload again; suspend now applies.
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"trainer": trainer}})
    await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused")["status"] == "False")
    assert cluster.get(JOBS, "rm-test")["spec"]["suspend"] is True  # re-sent with the revert
    assert rmj(cluster)["status"]["observedGeneration"] == 3


def operator_with_trainer_fields(monkeypatch: pytest.MonkeyPatch, **fields: tuple) -> None:
    """Turn the running operator into a version whose TrainerSpec has ``fields`` (create_model's
    ``name=(annotation, FieldInfo)``) added or redefined."""
    trainer = create_model("TrainerSpecNext", __base__=spec_module.TrainerSpec, **fields)
    spec_next = create_model("RewardModelJobSpecNext", __base__=spec_module.RewardModelJobSpec,
                             trainer=(trainer, Field(description="Trainer settings.")))

    def parse_spec_next(spec: dict) -> spec_module.RewardModelJobSpec:
        return spec_next.model_validate(spec)

    monkeypatch.setattr(handlers, "parse_spec", parse_spec_next)
    monkeypatch.setattr(render, "parse_spec", parse_spec_next)


def operator_with_a_new_trainer_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the running operator into its next version, whose RewardConfig has one more flag
    (``futureFlag``, default 7) and so whose CRD has one more defaulted trainer field."""
    operator_with_trainer_fields(monkeypatch,
                                 future_flag=(int, Field(default=7, description="A flag of the next version.")))


async def test_an_operator_upgrade_adding_a_trainer_flag_keeps_safe_edits_working(
        cluster: Cluster, operator: asyncio.Task, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulates an upgrade of the operator and its CRD that adds a trainer flag with a default:
    the API server then applies the new default when it reads an existing job (structural
    defaulting on read), so the job's spec gains a field its user never set. A safe edit made
    afterwards must still reach the workload. Also worth running against the real control
    plane (apply an old job, upgrade the CRD, patch runPolicy.suspend)."""
    await started(cluster, new_job(), JOBS)
    operator_with_a_new_trainer_flag(monkeypatch)
    trainer = {**new_job()["spec"]["trainer"], "futureFlag": 7}  # what the API server now returns
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"trainer": trainer, "runPolicy": {"suspend": True}}})
    await wait_for(lambda: cluster.get(JOBS, "rm-test")["spec"]["suspend"] is True, message="suspend applied")
    assert condition(rmj(cluster), "SpecChangeRefused") is None


def operator_with_another_default(monkeypatch: pytest.MonkeyPatch, field: str, default: object) -> None:
    """Turn the running operator into a version whose TrainerSpec has another default for ``field``."""
    info = spec_module.TrainerSpec.model_fields[field]
    operator_with_trainer_fields(monkeypatch, **{field: (info.annotation, Field(default=default, alias=info.alias))})


async def test_an_operator_upgrade_changing_a_default_keeps_safe_edits_working(
        cluster: Cluster, operator: asyncio.Task, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job was created when loraDropout defaulted to 0 (the API server stored that default,
    as a real one does; KMock does not default, so the job spells it out). The next operator
    defaults it to 0.05: the job still holds 0, which its user never changed, so a safe edit
    must still reach the workload."""
    body = new_job()
    body["spec"]["trainer"]["loraDropout"] = 0.0
    await started(cluster, body, JOBS)
    operator_with_another_default(monkeypatch, "lora_dropout", 0.05)
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"runPolicy": {"suspend": True}}})
    await wait_for(lambda: cluster.get(JOBS, "rm-test")["spec"]["suspend"] is True, message="suspend applied")
    assert condition(rmj(cluster), "SpecChangeRefused") is None
    # A real edit after the upgrade is still refused.
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"trainer": {"loraDropout": 0.05}}})
    refused = await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    assert refused["status"] == "True" and refused["message"].startswith("spec.trainer.loraDropout cannot change")


async def test_setting_a_field_left_unset_at_creation_is_refused(cluster: Cluster, operator: asyncio.Task) -> None:
    """An optional field without a default (absent from the stored job) is in the snapshot too:
    setting it later is an edit, not a field a newer schema added."""
    await started(cluster, new_job(), JOBS)
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"resources": {"priorityClassName": "high"}}})
    refused = await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    assert refused["message"].startswith("spec.resources.priorityClassName cannot change"), refused["message"]


async def test_a_workload_of_an_operator_that_kept_a_hash_adopts_the_spec_once(cluster: Cluster,
                                                                              operator: asyncio.Task) -> None:
    """Workloads of operators before the snapshot carry only rmjob.dev/spec-hash, computed with
    that operator's defaults (so it matches nothing now): the first edit adopts the current
    spec as the snapshot, with an Event, and applies the safe change; later edits are checked."""
    await started(cluster, new_job(), JOBS)
    job_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test"
    await api(cluster, "patch", job_path, {"metadata": {"annotations": {
        "rmjob.dev/spec-snapshot": None, "rmjob.dev/spec-hash": "0123456789abcdef"}}})
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"runPolicy": {"suspend": True}}})
    await wait_for(lambda: cluster.get(JOBS, "rm-test")["spec"]["suspend"] is True, message="suspend applied")
    assert condition(rmj(cluster), "SpecChangeRefused") is None
    adopted = await wait_for(lambda: [e for e in cluster.events_for("rm-test")
                                      if e["reason"] == "SpecSnapshotAdopted"])
    assert len(adopted) == 1 and "generation 2" in adopted[0]["message"]
    annotations = cluster.get(JOBS, "rm-test")["metadata"]["annotations"]
    assert "rmjob.dev/spec-hash" not in annotations
    assert json.loads(annotations["rmjob.dev/spec-snapshot"])["spec.trainer.learningRate"] == 3e-6

    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"trainer": {"learningRate": 1e-5}}})
    refused = await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    assert refused["message"].startswith("spec.trainer.learningRate cannot change")
    assert [e["reason"] for e in cluster.events_for("rm-test")].count("SpecSnapshotAdopted") == 1




async def test_a_field_a_later_schema_added_is_recorded_and_changing_it_later_is_refused(
        cluster: Cluster, operator: asyncio.Task) -> None:
    """A snapshot written before loraDropout existed lacks it: the value the API server filled
    in is no edit, but setting it to another value afterwards is (it was accepted, and the
    running workload kept the old behaviour)."""
    body = new_job()
    body["spec"]["trainer"]["loraDropout"] = 0.0  # the default the API server fills in
    await started(cluster, body, JOBS)
    job_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test"
    snapshot = json.loads(cluster.get(JOBS, "rm-test")["metadata"]["annotations"]["rmjob.dev/spec-snapshot"])
    del snapshot["spec.trainer.loraDropout"]
    await api(cluster, "patch", job_path, {"metadata": {"annotations": {
        "rmjob.dev/spec-snapshot": json.dumps(snapshot)}}})
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"runPolicy": {"suspend": True}}})
    await wait_for(lambda: cluster.get(JOBS, "rm-test")["spec"]["suspend"] is True, message="suspend applied")
    assert condition(rmj(cluster), "SpecChangeRefused") is None
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"trainer": {"loraDropout": 0.3}}})
    refused = await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    assert refused["message"].startswith("spec.trainer.loraDropout cannot change"), refused["message"]


def hash_of_an_earlier_operator(spec: dict) -> str:
    """rmjob.dev/spec-hash as operators before the snapshot wrote it: the values that differ
    from their defaults, without the safe runPolicy fields."""
    data = spec_module.parse_spec(spec).model_dump(by_alias=True, mode="json", exclude_defaults=True)
    run_policy = {k: v for k, v in data.pop("runPolicy", {}).items() if k not in handlers.SAFE_FIELDS}
    dump = json.dumps({**data, "runPolicy": run_policy} if run_policy else data, sort_keys=True)
    return hashlib.sha256(dump.encode()).hexdigest()[:16]


async def test_the_first_edit_of_a_workload_that_kept_a_hash_is_checked_when_the_hash_matches(
        cluster: Cluster, operator: asyncio.Task) -> None:
    """The hash of an earlier operator still matches the spec it was taken of while the defaults
    are the same: the first edit after the upgrade must be judged against that spec, not adopted
    (a learningRate change was accepted, and the workload kept running the old rate)."""
    body = new_job()
    await started(cluster, body, JOBS)
    job_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test"
    await api(cluster, "patch", job_path, {"metadata": {"annotations": {
        "rmjob.dev/spec-snapshot": None, "rmjob.dev/spec-hash": hash_of_an_earlier_operator(body["spec"])}}})
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"trainer": {"learningRate": 1e-5}}})
    refused = await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    assert refused["message"].startswith("spec.trainer.learningRate cannot change"), refused["message"]
    annotations = cluster.get(JOBS, "rm-test")["metadata"]["annotations"]
    assert json.loads(annotations["rmjob.dev/spec-snapshot"])["spec.trainer.learningRate"] == \
        body["spec"]["trainer"]["learningRate"]



async def test_the_first_edit_of_a_workload_that_kept_a_hash_takes_defaults_filled_in_since(
        cluster: Cluster, operator: asyncio.Task) -> None:
    """The spec the earlier operator hashed lacks fields its schema did not have; the API server
    now fills in their defaults (loraDropout 0 here): that is no edit. A real edit made with it
    is refused alone, and its revert is accepted (the filled-in field stayed refused for good)."""
    body = new_job()
    await started(cluster, body, JOBS)
    job_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test"
    await api(cluster, "patch", job_path, {"metadata": {"annotations": {
        "rmjob.dev/spec-snapshot": None, "rmjob.dev/spec-hash": hash_of_an_earlier_operator(body["spec"])}}})
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"trainer": {"loraDropout": 0.0, "learningRate": 1e-5}}})
    refused = await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    assert refused["message"].startswith("spec.trainer.learningRate cannot change"), refused["message"]
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {
        "trainer": {"learningRate": body["spec"]["trainer"]["learningRate"]}, "runPolicy": {"suspend": True}}})
    await wait_for(lambda: cluster.get(JOBS, "rm-test")["spec"]["suspend"] is True, message="suspend applied")
    await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused")["status"] == "False", message="accepted")


SNAPSHOT_SPEC = {"trainer": {"learningRate": 3e-6, "loraDropout": 0.0},
                 "resources": {"nodes": 2, "nodeSelector": {"pool": "a"}, "resources": {"limits": {"cpu": 1}}},
                 "runPolicy": {"suspend": False, "backoffLimit": 0}}


@pytest.mark.parametrize(("edit", "refused"), [
    ({}, []),
    ({"runPolicy": {"suspend": True, "backoffLimit": 0, "ttlSecondsAfterFinished": 60}}, []),  # the safe fields
    ({"trainer": {"learningRate": 1e-5, "loraDropout": 0.0}}, ["spec.trainer.learningRate"]),
    ({"trainer": {"learningRate": 3e-6}}, ["spec.trainer.loraDropout"]),  # an explicit value removed
    ({"trainer": {"learningRate": 3e-6, "loraDropout": 0.0, "numTrainEpochs": 2}}, ["spec.trainer.numTrainEpochs"]),
    ({"resources": {"nodes": 2, "nodeSelector": {"pool": "a", "zone": "b"}, "resources": {"limits": {"cpu": 1}}}},
     ["spec.resources.nodeSelector"]),  # a map is one field: a key added to it is an edit
    ({"resources": {"nodes": 2, "nodeSelector": {"pool": "a"}, "resources": {"limits": {"cpu": 2}}}},
     ["spec.resources.resources.limits"]),
    ({"hub": {"tokenSecretRef": {"name": "hf", "key": "token"}}},
     ["spec.hub.tokenSecretRef.key", "spec.hub.tokenSecretRef.name"]),
])
def test_unsafe_changes_compare_field_by_field(edit: dict, refused: list[str]) -> None:
    snapshot = handlers.spec_snapshot(SNAPSHOT_SPEC)
    assert handlers.unsafe_changes(snapshot, {**SNAPSHOT_SPEC, **edit}) == refused


def test_fields_a_later_schema_adds_or_removes_are_not_edits() -> None:
    snapshot = handlers.spec_snapshot(SNAPSHOT_SPEC)
    added = {**SNAPSHOT_SPEC, "trainer": {**SNAPSHOT_SPEC["trainer"], "futureFlag": 7}}
    assert handlers.unsafe_changes({k: v for k, v in snapshot.items() if k != "spec.trainer.loraDropout"},
                                   {**added, "trainer": {**added["trainer"], "loraDropout": 0.05}}) == []
    assert handlers.unsafe_changes({**snapshot, "spec.trainer.droppedFlag": 1}, SNAPSHOT_SPEC) == []
    assert "spec.runPolicy.suspend" not in snapshot and snapshot["spec.trainer.learningRate"] == 3e-6



def test_the_snapshot_of_a_large_spec_fits_the_annotation_limit() -> None:
    """The API server refuses an object whose annotations total over 256 KiB: a valid spec with
    64 long dataset paths made the workload uncreatable. A change in such a value is still seen."""
    mixer = {f"/data/{i:02d}/" + "x" * 5000 + ".jsonl": 1.0 for i in range(64)}
    spec = {"trainer": {"modelNameOrPath": "m", "datasetMixer": mixer}, "runPolicy": {"backend": "job"}}
    annotations = handlers.workload_annotations(spec, spec_module.parse_spec(spec))
    assert sum(len(key) + len(value) for key, value in annotations.items()) < 64 * 1024
    snapshot = json.loads(annotations["rmjob.dev/spec-snapshot"])
    assert handlers.unsafe_changes(snapshot, spec) == []
    edited = {**spec, "trainer": {**spec["trainer"], "datasetMixer": {**mixer, next(iter(mixer)): 0.5}}}
    assert handlers.unsafe_changes(snapshot, edited) == ["spec.trainer.datasetMixer"]
    written_whole = {**snapshot, "spec.trainer.datasetMixer": mixer}  # by the build before the digest
    assert handlers.unsafe_changes(written_whole, spec) == []
    assert handlers.unsafe_changes(written_whole, edited) == ["spec.trainer.datasetMixer"]


async def test_delete_leaves_cleanup_to_the_garbage_collector(cluster: Cluster, operator: asyncio.Task) -> None:
    await started(cluster, new_job(), JOBS)
    assert "finalizers" not in rmj(cluster)["metadata"]  # deletion never waits for the operator
    await api(cluster, "delete", rmj_path("rm-test"))
    await wait_for(lambda: cluster.get(RMJ, "rm-test") is None)
    collected = await collect_garbage(cluster)
    assert len(collected) == 6
    await asyncio.sleep(0.5)  # the operator must not resurrect anything for a deleted job
    assert cluster.live(JOBS) == [] and cluster.live(CONFIGMAPS) == []


async def recreate_before_garbage_collection(cluster: Cluster) -> str:
    """Start rm-test, delete it and create it again while its children are still there (the
    garbage collector has not run); returns the first job's uid."""
    await started(cluster, new_job(), JOBS)
    old_uid = rmj(cluster)["metadata"]["uid"]
    await api(cluster, "delete", rmj_path("rm-test"))
    await wait_for(lambda: cluster.get(RMJ, "rm-test") is None)
    await api(cluster, "post", rmj_path(), new_job())
    await wait_for(lambda: rmj(cluster) and rmj(cluster)["metadata"]["uid"] != old_uid, message="the new job")
    return old_uid


async def test_recreated_job_waits_for_the_old_children_then_starts(cluster: Cluster, operator: asyncio.Task,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulates kube-controller-manager's garbage collector, which deletes a deleted job's
    children asynchronously, some time after the job: the old children still hold their names
    when ``kubectl delete`` + ``kubectl apply`` re-creates the job. Also worth running against
    the real control plane (delete and re-apply an example at once)."""
    monkeypatch.setattr(handlers, "STALE_CHILD_RETRY_SECONDS", 0.2)
    old_uid = await recreate_before_garbage_collection(cluster)
    waiting = await wait_for(lambda: condition(rmj(cluster), "Created"), message="a Created condition")
    assert (waiting["status"], waiting["reason"]) == ("False", "WaitingForOldChildren")
    assert rmj(cluster)["status"]["phase"] == "Pending"

    assert await collect_garbage(cluster)
    await wait_for(lambda: (rmj(cluster).get("status") or {}).get("workload"), message="the new workload")
    new_uid = rmj(cluster)["metadata"]["uid"]
    for child in (cluster.get(JOBS, "rm-test"), cluster.get(CONFIGMAPS, "rm-test-config")):
        assert [ref["uid"] for ref in child["metadata"]["ownerReferences"]] == [new_uid] != [old_uid]
    assert condition(rmj(cluster), "Created")["status"] == "True"
    assert rmj(cluster)["status"]["phase"] == "Pending"


async def test_a_name_held_by_a_live_object_fails_the_job_with_a_condition(cluster: Cluster,
                                                                           operator: asyncio.Task) -> None:
    """A ConfigMap the user created by hand (no owner: the garbage collector never deletes it)
    holds the name of the job's ConfigMap: the job fails, once, saying which object."""
    await api(cluster, "post", f"/api/v1/namespaces/{NAMESPACE}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "rm-test-config", "namespace": NAMESPACE}})
    await api(cluster, "post", rmj_path(), new_job())
    await wait_for(phase_is(cluster, "Failed"))
    created = condition(rmj(cluster), "Created")
    assert (created["status"], created["reason"]) == ("False", "ChildNameTaken")
    assert created["message"].startswith("ConfigMap rm-test-config already exists")
    assert cluster.live(JOBS) == []


async def test_late_events_of_a_deleted_jobs_workload_do_not_reach_its_successor(
        cluster: Cluster, operator: asyncio.Task, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulates the Job controller finishing the old workload after its job was deleted and
    re-created under the same name (the garbage collector has not removed the workload yet)."""
    monkeypatch.setattr(handlers, "STALE_CHILD_RETRY_SECONDS", 0.2)
    await recreate_before_garbage_collection(cluster)
    await wait_for(phase_is(cluster, "Pending"))
    complete = {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "done"}
    await api(cluster, "patch", JOB_STATUS, {"status": {"conditions": [complete], "succeeded": 2}})
    await asyncio.sleep(0.5)
    status = rmj(cluster)["status"]
    assert status["phase"] == "Pending" and "completionTime" not in status
    assert condition(rmj(cluster), "Succeeded") is None


async def test_workloads_are_watched_with_a_server_side_label_selector(with_pytorchjob_crd: Cluster,
                                                                       operator: asyncio.Task) -> None:
    """Emulates what a real API server does with ``labelSelector`` on list and watch: only the
    Jobs and PyTorchJobs the operator labelled reach it, not every Job in the cluster (KMock
    ignores the parameter, so the requests themselves are checked)."""
    cluster = with_pytorchjob_crd
    await started(cluster, new_job(), PYTORCHJOBS)
    for suffix in ("/jobs", "/pytorchjobs"):
        reads = [r for r in cluster if r.method == kmock.method.GET and r.url.path.endswith(suffix)]
        assert reads, suffix
        assert {r.params.get("labelSelector") for r in reads} == {"rmjob.dev/job-name"}, suffix


INVALID = [
    ("learning rate", {"trainer": {**new_job()["spec"]["trainer"], "learningRate": -1}}, "spec.trainer.learningRate"),
    ("unknown field", {"resources": {"nodes": 1, "gpuz": 2}}, "spec.resources.gpuz"),
    ("no dataset", {"trainer": {"modelNameOrPath": "m"}}, "spec.trainer.datasetMixer"),
]


async def test_invalid_specs_fail_once_without_crashing_or_looping(cluster: Cluster, operator: asyncio.Task) -> None:
    for i, (_, sections, field) in enumerate(INVALID):
        await api(cluster, "post", rmj_path(), new_job(f"bad-{i}", **sections))
    for i, (case, _, field) in enumerate(INVALID):
        await wait_for(phase_is(cluster, "Failed", f"bad-{i}"), message=case)
        invalid = condition(rmj(cluster, f"bad-{i}"), "InvalidSpec")
        assert invalid["status"] == "True" and invalid["message"].startswith(field), (case, invalid)
        await wait_for(lambda: rmj(cluster, f"bad-{i}")["status"].get("kopf", {}).get("lastHandledSpec"))
        await wait_for(lambda: cluster.events_for(f"bad-{i}"))
    writes = [r for r in cluster if r.method != kmock.method.GET]
    await asyncio.sleep(1.0)
    assert [r for r in cluster if r.method != kmock.method.GET] == writes  # settled: no retry loop
    for i, _ in enumerate(INVALID):
        assert [e["reason"] for e in cluster.events_for(f"bad-{i}")] == ["Failed"]
    assert not operator.done()
    assert cluster.live(JOBS) == [] and cluster.live(CONFIGMAPS) == []

    # Fixing the spec starts the job.
    await api(cluster, "patch", rmj_path("bad-2"), {"spec": new_job()["spec"]})
    await wait_for(phase_is(cluster, "Pending", "bad-2"))
    assert condition(rmj(cluster, "bad-2"), "InvalidSpec")["status"] == "False"
    assert cluster.get(JOBS, "bad-2") is not None


class PodTemplateValidatingCluster(Cluster):
    """Answers a Job whose pod template has a PersistentVolumeClaim volume without claimName
    with the 422 the API server's pod-template validation gives (ValidatePodTemplateSpec)."""

    async def _handle(self, request: kmock.Request):
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict) and data.get("kind") == "Job":
            for i, volume in enumerate(data["spec"]["template"]["spec"].get("volumes", [])):
                if "persistentVolumeClaim" in volume and "claimName" not in volume["persistentVolumeClaim"]:
                    field = f"spec.template.spec.volumes[{i}].persistentVolumeClaim.claimName"
                    raise Unprocessable(
                        message=f'Job.batch "{data["metadata"]["name"]}" is invalid: {field}: Required value')
        return await super()._handle(request)


@attrs.frozen(kw_only=True)
class Unprocessable(KubernetesError):
    status: int = 422
    reason: str = "Invalid"
    message: str


async def test_a_child_the_api_server_refuses_fails_the_job_once(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: pathlib.Path) -> None:
    """Emulates the API server refusing an invalid pass-through pod field with 422 (what
    parse_spec cannot check: the contents of a volume source). Also worth running against the
    real control plane (a job with ``persistentVolumeClaim: {}``)."""
    async with emulated_cluster(PodTemplateValidatingCluster, monkeypatch, tmp_path) as cluster, running_operator():
        broken = new_job(resources={"nodes": 1, "gpusPerNode": 1,
                                    "volumes": [{"name": "data", "persistentVolumeClaim": {}}],
                                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]})
        await api(cluster, "post", rmj_path(), broken)
        await wait_for(phase_is(cluster, "Failed"), message="Failed")
        invalid = condition(rmj(cluster), "InvalidSpec")
        assert invalid["status"] == "True"
        assert invalid["message"].startswith("spec.resources: the API server refused Job rm-test: ")
        assert "persistentVolumeClaim.claimName: Required value" in invalid["message"]
        await wait_for(lambda: rmj(cluster)["status"].get("kopf", {}).get("lastHandledSpec"))
        await wait_for(lambda: cluster.events_for("rm-test"), message="an event")
        writes = [r for r in cluster if r.method != kmock.method.GET]
        await asyncio.sleep(1.0)
        assert [r for r in cluster if r.method != kmock.method.GET] == writes  # settled: no retry loop
        assert [e["reason"] for e in cluster.events_for("rm-test")] == ["Failed"]


async def test_pods_that_cannot_be_scheduled_are_not_running(cluster: Cluster, operator: asyncio.Task) -> None:
    """Emulates the Job controller's status for pods that exist but are not ready (no node
    fits, image still pulling): ``active`` counts them, ``ready`` does not."""
    await started(cluster, new_job(), JOBS)
    await api(cluster, "patch", JOB_STATUS, {"status": {"active": 2, "ready": 0}})
    await wait_for(lambda: "none ready" in rmj(cluster)["status"].get("message", ""), message="not-ready message")
    assert rmj(cluster)["status"]["phase"] == "Pending" and condition(rmj(cluster), "Running") is None


async def test_pods_the_job_controller_cannot_create_show_in_the_status(cluster: Cluster,
                                                                         operator: asyncio.Task) -> None:
    """Emulates kube-controller-manager's Job controller when pod creation is refused (here by
    Pod Security admission): it posts a ``FailedCreate`` Warning event on the Job and leaves
    its status alone. Also worth running against the real control plane (a namespace
    enforcing ``restricted`` and a job with a hostPath volume)."""
    job = await started(cluster, new_job(), JOBS)
    refusal = ('pods "rm-test-0-x7k2p" is forbidden: violates PodSecurity "restricted:latest": '
               'hostPath volumes (volume "data")')
    await api(cluster, "post", f"/api/v1/namespaces/{NAMESPACE}/events", {
        "apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": "FailedCreate", "message": f"Error creating: {refusal}",
        "metadata": {"name": "rm-test.1", "namespace": NAMESPACE},
        "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": "rm-test", "namespace": NAMESPACE,
                           "uid": job["metadata"]["uid"]},
    })
    failed = await wait_for(lambda: condition(rmj(cluster), "PodCreationFailed"), message="PodCreationFailed")
    assert (failed["status"], failed["reason"]) == ("True", "FailedCreate") and refusal in failed["message"]
    status = rmj(cluster)["status"]
    assert status["phase"] == "Pending" and status["message"].startswith("the Job cannot create pods: ")

    await api(cluster, "patch", JOB_STATUS, {"status": {"active": 2, "ready": 2}})  # fixed: pods run
    await wait_for(phase_is(cluster, "Running"))
    assert condition(rmj(cluster), "PodCreationFailed")["status"] == "False"


def test_a_workload_failure_reported_before_the_create_handler_finishes_stays_failed() -> None:
    """The workload watcher can run before the create handler records the workload (a Job
    that fails at once, e.g. an image that does not exist with backoffLimit 0): the create
    handler must not put the phase back to Pending (and the watcher then to Failed again,
    with a second event and completionTime)."""
    body = new_job()
    body["metadata"].update(uid="u1", generation=1)
    body["status"] = cond_module.workload_status_patch(
        body, "Job", {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
        cond_module.now_iso())
    assert body["status"]["phase"] == "Failed"
    patch = handlers.created_patch(body, spec_module.parse_spec(body["spec"]), render.workload_ref(body, "job"))
    assert "phase" not in patch and patch["workload"]["kind"] == "Job"


async def test_an_operator_restart_does_not_repeat_the_invalid_spec_warning(cluster: Cluster) -> None:
    """kopf runs the resume handler for every job when the operator starts (every upgrade or
    rescheduling of its pod): an invalid job already reported must not get a new Warning."""
    bad = new_job(trainer={"modelNameOrPath": "m"})
    async with running_operator():
        await api(cluster, "post", rmj_path(), bad)
        await wait_for(phase_is(cluster, "Failed"))
        await wait_for(lambda: cluster.events_for("rm-test"), message="the first event")
    before = len(list(cluster))
    async with running_operator():
        await wait_for(lambda: any(r.method == kmock.method.GET and r.url.path.endswith("/rm-test")
                                   for r in list(cluster)[before:]), message="the resumed job handled")
        await asyncio.sleep(1.0)
    assert [(e["type"], e["reason"]) for e in cluster.events_for("rm-test")] == [("Warning", "Failed")]


def example_jobs() -> list[dict]:
    docs = [doc for path in sorted(EXAMPLES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return [doc for doc in docs if doc.get("kind") == "RewardModelJob"]


def kubectl() -> str:
    """The kubectl `make install` puts in .tools/bin (scripts/install_tools.py), else one on PATH."""
    installed = REPO / ".tools" / "bin" / "kubectl"
    found = str(installed) if installed.exists() else shutil.which("kubectl")
    if found is None:
        pytest.skip("no kubectl: run `make install` (puts it in .tools/bin) or put kubectl on PATH")
    return found


async def test_kubectl_apply_of_the_examples_creates_their_workloads(with_pytorchjob_crd: Cluster,
                                                                    operator: asyncio.Task,
                                                                    tmp_path: pathlib.Path) -> None:
    """What a user does: the real kubectl applies the examples directory (KUBECONFIG from the fixture)."""
    cluster = with_pytorchjob_crd
    # KMock serves in this event loop: a blocking subprocess.run would deadlock it.
    proc = await asyncio.create_subprocess_exec(
        kubectl(), "apply", "--validate=false", "--namespace", NAMESPACE, "--cache-dir", str(tmp_path / "kube-cache"),
        "-f", str(EXAMPLES), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    examples = example_jobs()
    assert examples
    for doc in examples:
        assert f"rewardmodeljob.rmjob.dev/{doc['metadata']['name']} created" in stdout.decode()
    assert cluster.get("v1/persistentvolumeclaims", "reward-data") is not None  # pvc-dataset.yaml's claim

    for doc in examples:
        name = doc["metadata"]["name"]
        await wait_for(phase_is(cluster, "Pending", name), message=f"example {name}")
        job = rmj(cluster, name)
        # PyTorchJob (its CRD is installed here) unless the example asks for the Job backend.
        if doc["spec"].get("runPolicy", {}).get("backend") == "job":
            workload, resource = {"apiVersion": "batch/v1", "kind": "Job", "name": name}, JOBS
        else:
            workload, resource = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": name}, PYTORCHJOBS
        assert job["status"]["workload"] == workload
        for child in (cluster.get(resource, name), cluster.get(CONFIGMAPS, f"{name}-config")):
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"]) == ("RewardModelJob", name, job["metadata"]["uid"])


JOB = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test"


async def test_a_workload_deleted_while_running_fails_the_job_as_lost(cluster: Cluster, operator: asyncio.Task) -> None:
    await started(cluster, new_job(), JOBS)
    await api(cluster, "patch", JOB_STATUS, {"status": {"active": 2, "ready": 2}})
    await wait_for(phase_is(cluster, "Running"))
    await api(cluster, "delete", JOB)
    await wait_for(phase_is(cluster, "Failed"))
    status = rmj(cluster)["status"]
    assert condition(rmj(cluster), "Failed")["reason"] == "WorkloadLost"
    assert status["message"].startswith("Job rm-test was deleted before the job finished") and status["completionTime"]
    await wait_for(lambda: any(e["type"] == "Warning" and e["reason"] == "Failed" and "deleted" in e["message"]
                               for e in cluster.events_for("rm-test")))
    await asyncio.sleep(0.5)
    assert cluster.live(JOBS) == []  # never a second workload: it would train again from the start


async def test_a_finished_workload_removed_by_its_ttl_leaves_the_job_succeeded(cluster: Cluster) -> None:
    """Also across an operator restart: the resumed job finds no workload and keeps Succeeded."""
    async with running_operator():
        await started(cluster, new_job(), JOBS)
        complete = {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "done"}
        await api(cluster, "patch", JOB_STATUS, {"status": {"conditions": [complete], "succeeded": 2}})
        await wait_for(phase_is(cluster, "Succeeded"))
        before = rmj(cluster)["status"]
        await api(cluster, "delete", JOB)
        await asyncio.sleep(0.5)
        # An edit finds no workload to apply it to, and creates none.
        await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"runPolicy": {"ttlSecondsAfterFinished": 60}}})
        await wait_for(lambda: json.loads(rmj(cluster)["status"]["kopf"]["lastHandledSpec"])["spec"].get(
            "runPolicy", {}).get("ttlSecondsAfterFinished") == 60, message="the edit handled")
    async with running_operator():
        await asyncio.sleep(1)
    after = rmj(cluster)["status"]
    assert {k: v for k, v in after.items() if k != "kopf"} == {k: v for k, v in before.items() if k != "kopf"}
    assert cluster.live(JOBS) == []
    assert [e["reason"] for e in cluster.events_for("rm-test")].count("Succeeded") == 1


async def test_a_workload_deleted_while_the_operator_was_down_is_found_lost_on_restart(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deletion event is never seen (as while the operator is down: KMock answers no
    request once a first operator is cancelled, so the watcher is made deaf instead)."""
    async with running_operator():
        await started(cluster, new_job(), JOBS)
        await wait_for(phase_is(cluster, "Pending"))
        with monkeypatch.context() as deaf:
            deaf.setattr(handlers, "workload_gone", lambda *args, **kwargs: asyncio.sleep(0))
            await api(cluster, "delete", JOB)
            await asyncio.sleep(0.5)
        assert rmj(cluster)["status"]["phase"] == "Pending"
    async with running_operator():
        await wait_for(phase_is(cluster, "Failed"))
    assert condition(rmj(cluster), "Failed")["reason"] == "WorkloadLost"
    assert "while the operator was not watching" in rmj(cluster)["status"]["message"]
    assert cluster.live(JOBS) == []


async def test_job_locks_serialise_each_job_and_keep_nothing_once_released() -> None:
    locks, order = handlers.JobLocks(), []

    async def write(key: str, tag: str, fail: bool = False) -> None:
        async with locks.hold(key):
            order.append(f"{tag}+")
            await asyncio.sleep(0.01)
            order.append(f"{tag}-")
            if fail:
                raise RuntimeError(tag)

    results = await asyncio.gather(write("a", "a1"), write("a", "a2", fail=True), write("b", "b1"),
                                   return_exceptions=True)
    assert isinstance(results[1], RuntimeError)
    assert order.index("a1-") < order.index("a2+") and order.index("b1+") < order.index("a1-")
    assert len(locks) == 0
    waiting = asyncio.create_task(write("a", "a3"))
    async with locks.hold("a"):
        await asyncio.sleep(0.01)
        assert len(locks) == 1
        waiting.cancel()  # an operator shutting down: a cancelled waiter leaves nothing behind
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert len(locks) == 0


async def test_per_job_locks_are_released(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[handlers.JobLocks] = []
    original = handlers.JobLocks

    def recording() -> handlers.JobLocks:
        made.append(original())
        return made[-1]

    monkeypatch.setattr(handlers, "JobLocks", recording)
    async with running_operator():
        for i in range(3):
            await api(cluster, "post", rmj_path(), new_job(f"rm-{i}"))
        for i in range(3):
            await wait_for(lambda i=i: (rmj(cluster, f"rm-{i}").get("status") or {}).get("workload"))
        await api(cluster, "patch", rmj_path("rm-0"), {"spec": {"runPolicy": {"suspend": True}}})
        await wait_for(lambda: cluster.get(JOBS, "rm-0")["spec"]["suspend"] is True)
        (locks,) = made
        # Three jobs' status was written under their locks; none is kept once the writes end.
        await wait_for(lambda: rmj(cluster, "rm-0")["status"].get("observedGeneration") == 2)
        await wait_for(lambda: len(locks) == 0, message="every lock released")
