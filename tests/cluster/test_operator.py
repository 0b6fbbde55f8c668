"""`python -m rmjob_operator` against the real control plane, as the identity the chart's
ClusterRole makes it (never admin). One operator serves the module, watching one namespace
that enforces Pod Security `restricted`, so every job here also shows that its pods pass it.

Children, status round trip, the trainer's RBAC with a real token, garbage collection,
same-name re-create, a child refused by the API server, and pod creation refused."""

from __future__ import annotations

import json
import time

import pytest
from operator_harness import OperatorIdentity, new_namespace
from rmj import (GROUP_PATH, condition, cpu_spec, get_json, get_or_none, owned_by, rmj,
                 status_of, token_request, wait_for_phase, wait_until)

pytestmark = pytest.mark.cluster

RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"
# Keeps a deleted object in place until the test lets it go.
HOLD = "test.rmjob.dev/hold"


@pytest.fixture(scope="module")
def ns(kubectl):
    name = new_namespace(kubectl, RESTRICTED, "pod-security.kubernetes.io/enforce-version=latest")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def identity(cluster, kubectl, rmj_crd, ns, tmp_path_factory):
    """What the chart grants an operator confined to `ns` (watchNamespaces): a Role there and
    a ClusterRole of cluster-scoped reads."""
    created = OperatorIdentity(cluster, kubectl, tmp_path_factory.mktemp("identity"), f"watchNamespaces={{{ns}}}")
    yield created
    created.delete()


@pytest.fixture(scope="module")
def operator(start_operator, ns, identity):
    process = start_operator([ns], identity=identity)
    yield process
    assert process.stop() == 0, process.log()[-3000:]


def create(kubectl, ns: str, name: str, spec: dict) -> dict:
    kubectl("apply", "-f", "-", input=json.dumps(rmj(name, ns, spec)))
    return get_json(kubectl, "rmj", name, "-n", ns)


def children(kubectl, ns: str, name: str) -> dict[str, dict | None]:
    return {
        "configmap": get_or_none(kubectl, "configmap", f"{name}-config", "-n", ns),
        "serviceaccount": get_or_none(kubectl, "serviceaccount", f"{name}-trainer", "-n", ns),
        "role": get_or_none(kubectl, "role", f"{name}-trainer", "-n", ns),
        "rolebinding": get_or_none(kubectl, "rolebinding", f"{name}-trainer", "-n", ns),
        "service": get_or_none(kubectl, "service", name, "-n", ns),
        "job": get_or_none(kubectl, "job", name, "-n", ns),
    }


def pods(kubectl, ns: str, name: str) -> list[dict]:
    return get_json(kubectl, "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={name}")["items"]


@pytest.mark.parametrize("scope", ["cluster", "watched namespace"])
def test_the_operator_runs_as_the_charts_service_account_not_admin(kubectl, operator_identity, identity, ns, scope):
    """The identities have the chart's rights and no more: no Secrets, no pods, no deleting;
    the namespaced one nothing outside its namespace."""
    user, where = (operator_identity.username, ["-A"]) if scope == "cluster" else (identity.username, ["-n", ns])
    for verb, resource in (("create", "rewardmodeljobs.rmjob.dev/status"), ("get", "secrets"),
                           ("create", "pods"), ("delete", "jobs.batch"), ("update", "rewardmodeljobs.rmjob.dev")):
        allowed = kubectl("auth", "can-i", verb, resource, "--as", user, *where, check=False).stdout.strip()
        assert allowed == "no", (verb, resource)
    assert kubectl("auth", "can-i", "patch", "rewardmodeljobs.rmjob.dev", "--subresource=status",
                   "--as", user, *where).stdout.strip() == "yes"
    if scope != "cluster":
        assert kubectl("auth", "can-i", "create", "jobs.batch", "--as", user, "-n", "default",
                       check=False).stdout.strip() == "no"


def test_a_cpu_job_creates_its_children_and_succeeds_on_kwok_nodes(kubectl, ns, operator):
    job = create(kubectl, ns, "rm-cpu", cpu_spec())
    status = wait_for_phase(kubectl, ns, "rm-cpu", "Succeeded", operator=operator)
    for kind, child in children(kubectl, ns, "rm-cpu").items():
        assert child is not None, f"no {kind}"
        assert owned_by(child, job), kind
    assert status["workload"] == {"apiVersion": "batch/v1", "kind": "Job", "name": "rm-cpu"}
    assert condition(status, "Succeeded")["status"] == "True"
    assert status["completionTime"] and status["topology"] == {"nodes": 1, "gpusPerNode": 0, "worldSize": 1}
    # The pods passed Pod Security `restricted` (enforced in this namespace) and ran on KWOK nodes.
    ran = pods(kubectl, ns, "rm-cpu")
    assert ran and all(p["status"]["phase"] == "Succeeded" for p in ran)
    for pod in ran:  # any KWOK-managed node: a test module may add its own (kwok-gpu-node-0)
        node = get_json(kubectl, "node", pod["spec"]["nodeName"])
        assert node["metadata"]["annotations"].get("kwok.x-k8s.io/node") == "fake", pod["spec"]["nodeName"]
    labels = get_json(kubectl, "namespace", ns)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # The chart grants what kopf calls (namespaces included: refused, kopf retries them for a
    # minute before it handles any job).
    assert "forbidden" not in operator.log().lower(), operator.log()[-3000:]


def test_restricted_namespace_really_refuses_a_non_compliant_pod(kubectl, ns):
    """The PodSecurity admission plugin is on in this API server: the previous test's pods were judged."""
    refused = kubectl("run", "privileged", "-n", ns, "--image=busybox:1.37", "--restart=Never",
                      "--overrides", json.dumps({"spec": {"containers": [{
                          "name": "privileged", "image": "busybox:1.37",
                          "securityContext": {"privileged": True}}]}}), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr


def test_status_round_trip_prunes_nothing(kubectl, cluster, ns, operator):
    """The trainer's free-form status.training and everything the operator writes read back as
    written: the CRD's status schema covers all of it (a missing field would be pruned silently)."""
    create(kubectl, ns, "rm-status", cpu_spec(runPolicy={"suspend": True}))
    before = wait_until(lambda: status_of(kubectl, ns, "rm-status").get("workload"), 60, "workload recorded")
    assert before
    written = status_of(kubectl, ns, "rm-status")
    # Everything the operator wrote is there, including kopf's bookkeeping.
    for key in ("phase", "message", "conditions", "observedGeneration", "startTime", "workload", "topology"):
        assert key in written, key
    training = {"step": 5, "totalSteps": 10, "episode": 80, "epoch": 0.5, "trainLoss": 0.61,
                "trainAccuracy": 0.7, "evalLoss": 0.55, "evalAccuracy": 0.75, "evalRewardMargin": 1.25,
                "updateTime": "2026-11-29T12:00:00Z", "hub": {"repo": "org/rm", "revision": "main",
                                                               "commit": "abc", "url": "https://hf.co/org/rm"},
                "wandbUrl": "https://wandb.ai/org/rm/runs/1", "custom": {"nested": [1, {"deep": True}]}}
    kubectl("patch", "rmj", "rm-status", "-n", ns, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"training": training}}))

    def copied():
        status = status_of(kubectl, ns, "rm-status")
        return status if status.get("metrics", {}).get("step") == 5 else None

    status = wait_until(copied, 30, "metrics copied from status.training")
    assert status["training"] == training
    assert status["metrics"] == {k: training[k] for k in ("step", "totalSteps", "episode", "epoch", "trainLoss",
                                                          "trainAccuracy", "evalLoss", "evalAccuracy",
                                                          "evalRewardMargin")}
    assert status["hub"] == training["hub"] and status["wandb"] == {"url": training["wandbUrl"]}
    for key, value in written.items():
        if key != "kopf":
            assert status[key] == value, key
    # The status subresource ignores spec, and a status write does not bump generation.
    job = get_json(kubectl, "rmj", "rm-status", "-n", ns)
    kubectl("patch", "rmj", "rm-status", "-n", ns, "--subresource=status", "--type=merge",
            "-p", json.dumps({"spec": {"resources": {"nodes": 3}}, "status": {"message": "x"}}))
    after = get_json(kubectl, "rmj", "rm-status", "-n", ns)
    assert after["spec"]["resources"]["nodes"] == 1
    assert after["metadata"]["generation"] == job["metadata"]["generation"]


def test_the_trainer_token_may_patch_only_its_own_jobs_status(kubectl, cluster, ns, operator):
    for name in ("rm-rbac-a", "rm-rbac-b"):
        create(kubectl, ns, name, cpu_spec(runPolicy={"suspend": True}))
    for name in ("rm-rbac-a", "rm-rbac-b"):
        wait_until(lambda name=name: status_of(kubectl, ns, name).get("workload"), 60, f"{name} children")
    kubectl("create", "secret", "generic", "hf-token", "-n", ns, "--from-literal=token=hf_secret")
    # A real token from the TokenRequest API for job A's trainer account, as its pods get.
    token = kubectl("create", "token", "rm-rbac-a-trainer", "-n", ns, "--duration=10m").stdout.strip()
    jobs = f"{GROUP_PATH}/namespaces/{ns}/rewardmodeljobs"
    report = {"status": {"training": {"step": 1}}}

    code, body = token_request(cluster, token, "PATCH", f"{jobs}/rm-rbac-a/status", report)
    assert code == 200, body
    assert body["status"]["training"] == {"step": 1}
    refused = {
        "another job's status": ("PATCH", f"{jobs}/rm-rbac-b/status", report),
        "its own job's spec": ("PATCH", f"{jobs}/rm-rbac-a", {"spec": {"resources": {"nodes": 2}}}),
        "another job's spec": ("PATCH", f"{jobs}/rm-rbac-b", {"spec": {"resources": {"nodes": 2}}}),
        "reading its own job": ("GET", f"{jobs}/rm-rbac-a", None),
        "a Secret": ("GET", f"/api/v1/namespaces/{ns}/secrets/hf-token", None),
        "listing Secrets": ("GET", f"/api/v1/namespaces/{ns}/secrets", None),
    }
    for what, (method, path, body) in refused.items():
        code, answer = token_request(cluster, token, method, path, body)
        assert code == 403, (what, code, answer)
        assert answer["reason"] == "Forbidden"
        assert f"system:serviceaccount:{ns}:rm-rbac-a-trainer" in answer["message"], answer["message"]


def test_deleting_a_job_garbage_collects_its_children_and_pods(kubectl, ns, operator):
    create(kubectl, ns, "rm-gc", cpu_spec())
    wait_for_phase(kubectl, ns, "rm-gc", "Succeeded", operator=operator)
    assert all(children(kubectl, ns, "rm-gc").values()) and pods(kubectl, ns, "rm-gc")
    kubectl("delete", "rmj", "rm-gc", "-n", ns, "--wait=false")
    wait_until(lambda: not any(children(kubectl, ns, "rm-gc").values()) and not pods(kubectl, ns, "rm-gc"),
               90, "the garbage collector to delete the children and pods", interval=1)


def test_same_name_re_create_waits_for_the_old_workload_and_ignores_its_events(kubectl, ns, operator):
    """Delete and create again at once. The old Job is held (a finalizer of the test's) after
    the garbage collector deleted it: the new job waits instead of failing, an event of the old
    Job (Succeeded) does not reach it, and once the old Job is gone it gets a Job of its own."""
    old = create(kubectl, ns, "rm-again", cpu_spec())
    wait_for_phase(kubectl, ns, "rm-again", "Succeeded", operator=operator)
    kubectl("patch", "job", "rm-again", "-n", ns, "--type=merge",
            "-p", json.dumps({"metadata": {"finalizers": [HOLD]}}))
    old_job = get_json(kubectl, "job", "rm-again", "-n", ns)
    kubectl("delete", "rmj", "rm-again", "-n", ns, "--wait=false")
    wait_until(lambda: get_json(kubectl, "job", "rm-again", "-n", ns)["metadata"].get("deletionTimestamp"), 60,
               "the garbage collector deleting the old Job")
    new = create(kubectl, ns, "rm-again", cpu_spec(runPolicy={"suspend": True}))
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    try:
        waiting = wait_until(lambda: (condition(status_of(kubectl, ns, "rm-again"), "Created") or {}).get(
            "reason") == "WaitingForOldChildren" and status_of(kubectl, ns, "rm-again"), 60, "the new job waiting")
        assert waiting["phase"] == "Pending"
        # An event of the old Job, which has the new job's name but the old one's uid.
        kubectl("annotate", "job", "rm-again", "-n", ns, "rmjob.dev/test-touch=1")
        time.sleep(3)
        assert status_of(kubectl, ns, "rm-again")["phase"] == "Pending", status_of(kubectl, ns, "rm-again")
    finally:
        kubectl("patch", "job", "rm-again", "-n", ns, "--type=json",
                "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]), check=False)

    def own_workload():
        job = get_or_none(kubectl, "job", "rm-again", "-n", ns)
        return job if job and owned_by(job, new) else None

    job = wait_until(own_workload, 90, "the new job's own Job", interval=1)
    assert job["metadata"]["uid"] != old_job["metadata"]["uid"]
    assert job["spec"]["suspend"] is True
    status = wait_for_phase(kubectl, ns, "rm-again", "Suspended", operator=operator)
    assert condition(status, "Succeeded") is None or condition(status, "Succeeded")["status"] != "True"
    assert all(owned_by(child, new) for child in children(kubectl, ns, "rm-again").values())


def test_a_child_the_api_server_refuses_fails_the_job_with_invalid_spec(kubectl, ns, operator):
    """A pass-through field parse_spec cannot judge (a toleration operator): the Job is refused
    with 422, and the job fails with InvalidSpec instead of retrying for ever."""
    create(kubectl, ns, "rm-422", cpu_spec(resources={"gpusPerNode": 0, "tolerations": [
        {"key": "a", "operator": "Sometimes", "effect": "NoSchedule"}]}))
    status = wait_for_phase(kubectl, ns, "rm-422", "Failed", operator=operator)
    invalid = condition(status, "InvalidSpec")
    assert invalid and invalid["status"] == "True"
    assert invalid["message"].startswith("spec.resources: the API server refused Job rm-422"), invalid["message"]
    assert "operator" in invalid["message"]
    assert get_or_none(kubectl, "job", "rm-422", "-n", ns) is None


def test_pod_creation_refused_is_surfaced_in_status(kubectl, ns, operator):
    """The Job's pods name a ServiceAccount that does not exist: the Job controller's
    FailedCreate reaches the job's status instead of a silent Pending."""
    create(kubectl, ns, "rm-nosa", cpu_spec(resources={"gpusPerNode": 0, "serviceAccountName": "missing"}))

    def surfaced():
        found = condition(status_of(kubectl, ns, "rm-nosa"), "PodCreationFailed")
        return found if found and found["status"] == "True" else None

    try:
        found = wait_until(surfaced, 90, "a PodCreationFailed condition", interval=1)
    except AssertionError:
        raise AssertionError(f"{status_of(kubectl, ns, 'rm-nosa')}\n{operator.log()[-3000:]}") from None
    assert "missing" in found["message"], found
    assert status_of(kubectl, ns, "rm-nosa")["phase"] == "Pending"


def test_pods_that_cannot_be_scheduled_do_not_make_the_job_running(kubectl, ns, operator):
    """The Job controller counts a pod that no node takes as active; only ready pods train."""
    create(kubectl, ns, "rm-nowhere", cpu_spec(resources={"gpusPerNode": 0,
                                                          "nodeSelector": {"rmjob.dev/no-such-node": "true"}}))
    wait_until(lambda: (get_or_none(kubectl, "job", "rm-nowhere", "-n", ns) or {}).get("status", {}).get("active"),
               60, "the Job's pod created (active)")
    pod = pods(kubectl, ns, "rm-nowhere")[0]
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    wait_until(lambda: status_of(kubectl, ns, "rm-nowhere").get("phase"), 30, "a phase")
    time.sleep(3)  # the operator has seen the Job's active pod by now
    status = status_of(kubectl, ns, "rm-nowhere")
    assert status["phase"] == "Pending", status
