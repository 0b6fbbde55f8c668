"""The operator process under failure against the real control plane: SIGKILLed between
creating a job's children and recording them, a 409 answered to a status write, two replicas
with kopf peering; what it asks the API server (a server-side label selector on the workload
watch); and the shipped ValidatingAdmissionPolicy enforced by the API server itself."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid

import pytest
import yaml
from api_proxy import ApiProxy, Fault
from operator_harness import CHART, REPO, OperatorIdentity, namespace_fixture
from rmj import (GROUP_PATH, cpu_spec, get_json, get_or_none, owned_by, rmj, status_of,
                 wait_established, wait_for_phase, wait_until)

pytestmark = pytest.mark.cluster

JOBS_PATH = "/apis/batch/v1"


def create(kubectl, ns: str, name: str, spec: dict) -> dict:
    kubectl("apply", "-f", "-", input=json.dumps(rmj(name, ns, spec)))
    return get_json(kubectl, "rmj", name, "-n", ns)


def namespaced_identity(cluster, kubectl, ns: str, workdir, *set_values: str) -> OperatorIdentity:
    return OperatorIdentity(cluster, kubectl, workdir, f"watchNamespaces={{{ns}}}", *set_values)


ns = namespace_fixture()


@pytest.fixture
def identity(cluster, kubectl, rmj_crd, ns, tmp_path):
    created = namespaced_identity(cluster, kubectl, ns, tmp_path)
    yield created
    created.delete()


def apply_objects(kubectl, objects: list[dict]) -> None:
    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def delete_objects(kubectl, objects: list[dict]) -> None:
    for obj in objects:
        kubectl("delete", obj["kind"], obj["metadata"]["name"], "--ignore-not-found", "--wait=false", check=False)


def deny_policy(name: str, ns: str, resources: list[str], operations: list[str], message: str) -> list[dict]:
    """A ValidatingAdmissionPolicy (and its binding, confined to ``ns``) refusing every request."""
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": name},
         "spec": {"failurePolicy": "Fail",
                  "matchConstraints": {"resourceRules": [{"apiGroups": ["rmjob.dev"], "apiVersions": ["*"],
                                                          "operations": operations, "resources": resources}]},
                  "validations": [{"expression": "false", "message": message}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": name},
         "spec": {"policyName": name, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}},
    ]


def status_write_refused(kubectl, ns: str, name: str) -> bool:
    result = kubectl("patch", "rmj", name, "-n", ns, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": {"message": "probe"}}), check=False)
    return result.returncode != 0


def test_killed_between_children_and_status_then_restarted_makes_exactly_one_workload(
        kubectl, ns, identity, start_operator):
    """Status writes are refused (an admission policy) so the operator creates the children and
    then cannot record them; it is SIGKILLed there. Its successor finds the children (409 on
    each create), adopts them as its own and records the one workload."""
    frozen = deny_policy(f"freeze-{ns}", ns, ["rewardmodeljobs/status"], ["UPDATE"], "status frozen by the test")
    create(kubectl, ns, "rm-probe", cpu_spec(runPolicy={"suspend": True}))
    apply_objects(kubectl, frozen)
    try:
        wait_until(lambda: status_write_refused(kubectl, ns, "rm-probe"), 30, "the freezing policy in force")
        first = start_operator([ns], identity=identity)
        job = create(kubectl, ns, "rm-kill", cpu_spec(runPolicy={"suspend": True}))
        workload = wait_until(lambda: get_or_none(kubectl, "job", "rm-kill", "-n", ns), 60, "the Job created")
        wait_until(lambda: "status frozen by the test" in first.log(), 30, "the refused status write")
        first.kill()
        assert not status_of(kubectl, ns, "rm-kill").get("workload"), "the kill came too late"
    finally:
        delete_objects(kubectl, frozen)
    wait_until(lambda: not status_write_refused(kubectl, ns, "rm-probe"), 30, "status writes allowed again")

    second = start_operator([ns], identity=identity)
    wait_until(lambda: status_of(kubectl, ns, "rm-kill").get("workload"), 60, "the workload recorded")
    status = wait_for_phase(kubectl, ns, "rm-kill", "Suspended", operator=second)
    assert status["workload"] == {"apiVersion": "batch/v1", "kind": "Job", "name": "rm-kill"}
    jobs = get_json(kubectl, "jobs", "-n", ns, "-l", "rmjob.dev/job-name=rm-kill")["items"]
    assert [j["metadata"]["uid"] for j in jobs] == [workload["metadata"]["uid"]]
    assert owned_by(jobs[0], job)
    assert second.stop() == 0


@pytest.fixture
def proxied_operator(cluster, kubectl, ns, identity, start_operator, tmp_path):
    """The operator reaching the API server through an ApiProxy (yielded)."""
    proxy = ApiProxy(cluster.server, cluster.pki / "ca.crt").start()
    kubeconfig = tmp_path / "proxied.kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "proxy", "cluster": {"server": proxy.url}}],
        "users": [{"name": "operator", "user": {"token": identity.token}}],
        "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "operator"}}],
        "current-context": "proxy"}))
    proxy.operator = start_operator([ns], kubeconfig=kubeconfig)
    yield proxy
    proxy.operator.stop()
    proxy.stop()


def test_a_conflict_on_a_status_write_is_retried_not_fatal(kubectl, ns, proxied_operator):
    """The API server answers the operator's status write with 409 Conflict (what a write
    racing another one gets): the operator reads the job again and writes again, at once."""
    conflict = Fault(lambda method, url, body: method == "PATCH" and url.startswith(
        f"{GROUP_PATH}/namespaces/{ns}/rewardmodeljobs/rm-conflict/status") and b'"workload"' in body
        and b'"kopf"' not in body, 409, "Conflict")
    proxied_operator.faults.append(conflict)
    create(kubectl, ns, "rm-conflict", cpu_spec())
    # Well before kopf's own retry of a failed handler (60 s).
    status = wait_until(lambda: status_of(kubectl, ns, "rm-conflict").get("workload") and
                        status_of(kubectl, ns, "rm-conflict"), 30, "the workload recorded despite the 409")
    assert conflict.served == 1
    assert status["workload"]["name"] == "rm-conflict"
    wait_for_phase(kubectl, ns, "rm-conflict", "Succeeded", operator=proxied_operator.operator)
    assert "Handler 'reconcile' failed" not in proxied_operator.operator.log()


def test_a_503_on_the_final_status_write_is_retried(kubectl, ns, proxied_operator):
    """The API server answers the write of ``Succeeded`` with 503 (overloaded, or restarting):
    the Job that finished sends no further event and kopf drops an event handler's error, so
    the operator itself must write again, or the job never leaves Running/Pending. The outage
    lasts 5 s from the first refused write: the Job's last events (SuccessCriteriaMet, then
    Complete) all fall into it."""
    outage_start: list[float] = []

    def succeeded_write_in_outage(method: str, url: str, body: bytes) -> bool:
        if not (method == "PATCH" and url.startswith(
                f"{GROUP_PATH}/namespaces/{ns}/rewardmodeljobs/rm-unavailable/status") and b'"Succeeded"' in body):
            return False
        outage_start[:] = outage_start or [time.monotonic()]
        return time.monotonic() - outage_start[0] < 5

    unavailable = Fault(succeeded_write_in_outage, 503, "ServiceUnavailable", count=1000)
    proxied_operator.faults.append(unavailable)
    create(kubectl, ns, "rm-unavailable", cpu_spec())
    wait_for_phase(kubectl, ns, "rm-unavailable", "Succeeded", timeout=60, operator=proxied_operator.operator)
    assert unavailable.served >= 1


def test_workloads_are_watched_with_a_server_side_label_selector(kubectl, ns, proxied_operator):
    create(kubectl, ns, "rm-watch", cpu_spec())
    wait_for_phase(kubectl, ns, "rm-watch", "Succeeded", operator=proxied_operator.operator)
    job_requests = [url for method, url in proxied_operator.requests
                    if method == "GET" and re.match(rf"{JOBS_PATH}(/namespaces/{ns})?/jobs(\?|$)", url)]
    assert job_requests, proxied_operator.requests
    # Lists and watches alike: the API server filters, so other Jobs never reach the operator.
    for url in job_requests:
        assert "labelSelector=rmjob.dev%2Fjob-name" in url or "labelSelector=rmjob.dev/job-name" in url, url
    assert any("watch=true" in url for url in job_requests)


def test_events_are_watched_with_a_server_side_field_selector(kubectl, ns, proxied_operator):
    """Only the Warning events not about pods reach the operator (the API server filters), and
    the Job controller's FailedCreate is still among them."""
    create(kubectl, ns, "rm-events", cpu_spec(resources={"gpusPerNode": 0, "serviceAccountName": "missing"}))

    def surfaced():
        found = [c for c in status_of(kubectl, ns, "rm-events").get("conditions", [])
                 if c["type"] == "PodCreationFailed" and c["status"] == "True"]
        return found or None

    wait_until(surfaced, 90, "a PodCreationFailed condition")
    event_requests = [url for method, url in proxied_operator.requests
                      if method == "GET" and re.match(rf"/api/v1(/namespaces/{ns})?/events(\?|$)", url)]
    assert any("watch=true" in url for url in event_requests), proxied_operator.requests
    for url in event_requests:
        selector = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("fieldSelector")
        assert selector and set(selector[0].split(",")) == {"type=Warning", "involvedObject.kind!=Pod"}, url


# kopf's peering entries live 60 s; the standby sees the dead one's expire at its next check.
TAKEOVER_LIMIT_S = 150


def test_two_replicas_with_peering_exactly_one_acts(cluster, kubectl, ns, rmj_crd, tmp_path, start_operator):
    for path in (CHART / "crds" / "kopf-peerings.yaml",):
        kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=rmjob-tests", "-f", str(path))
    wait_established(kubectl, "kopfpeerings.kopf.dev")
    identity = namespaced_identity(cluster, kubectl, ns, tmp_path, "peering.enabled=true")
    try:
        peering = next(o for o in identity.objects if o["kind"] == "KopfPeering")["metadata"]["name"]
        replicas = [start_operator([ns], f"--peering={peering}", identity=identity) for _ in range(2)]

        def peers():
            found = get_or_none(kubectl, "kopfpeering", peering, "-n", ns) or {}
            return found if len((found.get("status") or {})) == 2 else None

        seen = wait_until(peers, 60, "both replicas in the peering object")
        priorities = [peer["priority"] for peer in seen["status"].values()]
        assert len(set(priorities)) == 2, seen["status"]
        names = [f"rm-ha-{i}" for i in range(3)]
        for name in names:
            create(kubectl, ns, name, cpu_spec())
        for name in names:
            wait_for_phase(kubectl, ns, name, "Succeeded", operator=replicas[0])
        created = [[line for line in r.log().splitlines() if re.search(r"created Job rm-ha-\d", line)]
                   for r in replicas]
        # Every job handled, each by one replica, and always the same one.
        assert sorted(len(lines) for lines in created) == [0, 3], [r.log()[-2000:] for r in replicas]

        # The active replica dies without a word (no peering entry withdrawn): the other one
        # takes over once that entry expires, and reconciles a job applied meanwhile.
        active, standby = replicas if created[0] else replicas[::-1]
        active.kill()
        killed = time.monotonic()
        create(kubectl, ns, "rm-ha-after", cpu_spec())
        wait_until(lambda: get_or_none(kubectl, "job", "rm-ha-after", "-n", ns), TAKEOVER_LIMIT_S,
                   "the standby replica to create the workload", interval=1)
        takeover = time.monotonic() - killed
        print(f"standby took over {takeover:.1f} s after the active replica was killed")
        assert "created Job rm-ha-after" in standby.log()
        wait_for_phase(kubectl, ns, "rm-ha-after", "Succeeded", operator=standby)
        assert standby.stop() == 0
    finally:
        identity.delete()


def test_the_shipped_admission_policy_is_enforced_by_the_api_server(kubectl, ns, rmj_crd):
    """manifests/admission-policy.yaml as shipped, its binding confined to this namespace (the
    cluster is shared)."""
    policy, binding = yaml.safe_load_all((REPO / "manifests" / "admission-policy.yaml").read_text())
    suffix = uuid.uuid4().hex[:6]
    policy["metadata"]["name"] = f"{policy['metadata']['name']}-{suffix}"
    binding["metadata"]["name"] = policy["metadata"]["name"]
    binding["spec"]["policyName"] = policy["metadata"]["name"]
    binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
    host_path = cpu_spec(resources={"gpusPerNode": 0, "volumes": [{"name": "host", "hostPath": {"path": "/"}}]})
    apply_objects(kubectl, [policy, binding])
    try:
        def refused(name: str, spec: dict) -> str | None:
            result = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(rmj(name, ns, spec)),
                             check=False)
            return result.stderr if result.returncode else None

        message = wait_until(lambda: refused("rm-host", host_path), 30, "the policy in force")
        assert "spec.resources.volumes must not use hostPath" in message and "Forbidden" in message, message
        other_account = refused("rm-sa", cpu_spec(resources={"gpusPerNode": 0, "serviceAccountName": "default"}))
        assert other_account and "serviceAccountName must be the job's own NAME-trainer account" in other_account
        assert refused("rm-own", cpu_spec(resources={"gpusPerNode": 0, "serviceAccountName": "rm-own-trainer"})) is None
        assert refused("rm-plain", cpu_spec()) is None
    finally:
        delete_objects(kubectl, [binding, policy])
