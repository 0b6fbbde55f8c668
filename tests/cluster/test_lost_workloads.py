"""Lost workloads against the real control plane and the operator process: a workload deleted
while its job runs fails the job as WorkloadLost; a finished one removed by its TTL leaves the
job Succeeded and is never replaced; a child name held by an object of someone else's gets a
condition and one Event, and no retries."""

from __future__ import annotations

import json
import time

import pytest
from operator_harness import namespace_fixture, operator_fixture
from rmj import condition, cpu_spec, get_json, get_or_none, owned_by, rmj, status_of, wait_for_phase, wait_until

pytestmark = pytest.mark.cluster

# No node has it: the Job's pods stay unbound, and the test reports them ready as a kubelet would.
NOWHERE = {"gpusPerNode": 0, "nodeSelector": {"test.rmjob.dev/no-such-node": "true"}}


ns = namespace_fixture("module")
operator = operator_fixture("module")


def create(kubectl, ns: str, name: str, spec: dict) -> dict:
    kubectl("apply", "-f", "-", input=json.dumps(rmj(name, ns, spec)))
    return get_json(kubectl, "rewardmodeljobs.rmjob.dev", name, "-n", ns)


def events(kubectl, ns: str, name: str) -> list[dict]:
    return get_json(kubectl, "events", "-n", ns, "--field-selector",
                    f"involvedObject.name={name},involvedObject.kind=RewardModelJob")["items"]


def mark_ready(kubectl, ns: str, pod: dict) -> None:
    """What a kubelet reports for a started, ready container."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container = pod["spec"]["containers"][0]
    kubectl("patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {
                "phase": "Running", "startTime": now,
                "conditions": [{"type": kind, "status": "True", "lastTransitionTime": now}
                               for kind in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
                "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                       "ready": True, "started": True, "restartCount": 0,
                                       "state": {"running": {"startedAt": now}}}]}}))


def test_a_workload_deleted_while_the_job_runs_fails_it_as_lost(kubectl, ns, operator):
    create(kubectl, ns, "rm-lost", cpu_spec(resources=NOWHERE))
    pods = wait_until(lambda: get_json(kubectl, "pods", "-n", ns, "-l", "batch.kubernetes.io/job-name=rm-lost")[
        "items"], 90, "the Job's pod", interval=1)
    for pod in pods:
        mark_ready(kubectl, ns, pod)
    wait_for_phase(kubectl, ns, "rm-lost", "Running", operator=operator)

    kubectl("delete", "job", "rm-lost", "-n", ns, "--wait=false")
    status = wait_for_phase(kubectl, ns, "rm-lost", "Failed", operator=operator)
    failed = condition(status, "Failed")
    assert failed["reason"] == "WorkloadLost", failed
    assert status["message"].startswith("Job rm-lost was deleted before the job finished"), status
    assert condition(status, "Running")["status"] == "False" and status["completionTime"]
    warned = wait_until(lambda: [e for e in events(kubectl, ns, "rm-lost")
                                 if e["type"] == "Warning" and e["reason"] == "Failed"], 30, "a Warning Event")
    assert "was deleted" in warned[0]["message"]
    time.sleep(5)
    assert get_or_none(kubectl, "job", "rm-lost", "-n", ns) is None  # never a second workload
    assert operator.log().count("created Job rm-lost") == 1


def test_a_finished_workload_removed_by_its_ttl_leaves_the_job_succeeded(kubectl, ns, operator):
    """ttlSecondsAfterFinished: 0, so the TTL controller deletes the Job as soon as it finishes
    (its deletion may be the first event the operator sees of the finish)."""
    create(kubectl, ns, "rm-ttl", cpu_spec(runPolicy={"ttlSecondsAfterFinished": 0}))
    wait_until(lambda: status_of(kubectl, ns, "rm-ttl").get("workload"), 60, "the workload")
    # Minutes, not seconds, on a shared control plane whose Job controller has a backlog.
    wait_until(lambda: get_or_none(kubectl, "job", "rm-ttl", "-n", ns) is None, 300,
               "the TTL controller to delete the finished Job", interval=1)
    status = wait_for_phase(kubectl, ns, "rm-ttl", "Succeeded", operator=operator)
    time.sleep(5)
    assert status_of(kubectl, ns, "rm-ttl") == status
    assert get_or_none(kubectl, "job", "rm-ttl", "-n", ns) is None
    assert operator.log().count("created Job rm-ttl") == 1
    assert [e["reason"] for e in events(kubectl, ns, "rm-ttl")].count("Succeeded") == 1


def test_a_child_name_held_by_someone_else_gets_a_condition_and_one_event_without_retries(kubectl, ns, operator):
    # A ConfigMap of the user's (no owner), and a Job owned by another live object.
    kubectl("create", "configmap", "rm-taken-config", "-n", ns)
    holder = json.loads(kubectl("create", "configmap", "holder", "-n", ns, "-o", "json").stdout)
    kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "rm-held", "namespace": ns, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "holder", "uid": holder["metadata"]["uid"]}]},
        "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "c", "image": "busybox:1.37"}]}}}}))
    for name, kind, child in (("rm-taken", "ConfigMap", "rm-taken-config"), ("rm-held", "Job", "rm-held")):
        job = create(kubectl, ns, name, cpu_spec())
        status = wait_for_phase(kubectl, ns, name, "Failed", operator=operator)
        created = condition(status, "Created")
        assert (created["status"], created["reason"]) == ("False", "ChildNameTaken"), created
        assert created["message"].startswith(f"{kind} {child} already exists and does not belong to this job")
        assert not owned_by(get_json(kubectl, kind.lower(), child, "-n", ns), job)
        wait_until(lambda name=name: events(kubectl, ns, name), 30, "an Event")
    before = {name: (get_json(kubectl, "rewardmodeljobs.rmjob.dev", name, "-n", ns)["metadata"]["resourceVersion"],
                     len(events(kubectl, ns, name)), operator.log().count(name))
              for name in ("rm-taken", "rm-held")}
    time.sleep(15)  # three of the 5 s retries a loop would make
    after = {name: (get_json(kubectl, "rewardmodeljobs.rmjob.dev", name, "-n", ns)["metadata"]["resourceVersion"],
                    len(events(kubectl, ns, name)), operator.log().count(name))
             for name in ("rm-taken", "rm-held")}
    assert after == before
    for name in ("rm-taken", "rm-held"):
        (event,) = events(kubectl, ns, name)
        assert (event["type"], event["reason"], event.get("count", 1)) == ("Warning", "Failed", 1)
