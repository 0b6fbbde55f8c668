"""The Helm chart, rendered by the real helm binary and checked against Kubernetes' schemas."""

from __future__ import annotations

import filecmp

import celpy
import kubernetes_validate
import pytest
import yaml

from conftest import CHART, MANIFESTS, by_kind, run

K8S_VERSION = kubernetes_validate.latest_version()
# Kinds that are not built into Kubernetes: kubernetes_validate has no schema for them.
CUSTOM_KINDS = {"KopfPeering", "ClusterKopfPeering"}

VALUE_SETS = {
    "defaults": [],
    "namespace-scope": ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a,team-b}"],
    "custom-image-resources-placement": [
        "--set", "image.repository=registry.example.com/ml/rmjob-operator", "--set", "image.tag=1.2.3",
        "--set", "trainerImage.tag=1.2.3-cu128",
        "--set", "resources.requests.cpu=50m", "--set", "resources.limits.memory=1Gi",
        "--set", "nodeSelector.pool=system", "--set", "tolerations[0].key=dedicated",
        "--set", "tolerations[0].operator=Exists", "--set", "priorityClassName=system-cluster-critical",
    ],
    "peering-ha": ["--set", "peering.enabled=true", "--set", "replicaCount=2"],
    "trainer-account": ["--set", "trainerServiceAccount.create=true",
                        "--set", "trainerServiceAccount.namespaces={ml}"],
    "no-metrics": ["--set", "metrics.enabled=false"],
}
# Not built into Kubernetes either, and absent from the value sets above: checked on its own.
SERVICE_MONITOR = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=prom"]


def operator_container(objects: list[dict]) -> dict:
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("flags", [[], ["--set", "rbac.scope=namespace"]], ids=["cluster", "namespace"])
def test_helm_lint_strict(tools, flags):
    run(tools / "helm", "lint", "--strict", CHART, *flags)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_objects_are_valid_kubernetes(helm_template, name):
    objects = helm_template(*VALUE_SETS[name])
    assert by_kind(objects, "Deployment")
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_operator_pod_is_locked_down(helm_template):
    objects = helm_template()
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    container = operator_container(objects)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert container["resources"]["limits"] and container["resources"]["requests"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]


def test_images_default_to_app_version_and_can_be_overridden(helm_template):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    container = operator_container(helm_template())
    assert container["image"] == f"ghcr.io/rmjob/rmjob-operator:{app_version}"
    assert {"name": "RMJOB_TRAINER_IMAGE", "value": f"ghcr.io/rmjob/rmjob-trainer:{app_version}"} in container["env"]

    objects = helm_template(*VALUE_SETS["custom-image-resources-placement"])
    container = operator_container(objects)
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert container["image"] == "registry.example.com/ml/rmjob-operator:1.2.3"
    assert {"name": "RMJOB_TRAINER_IMAGE", "value": "ghcr.io/rmjob/rmjob-trainer:1.2.3-cu128"} in container["env"]
    assert container["resources"]["requests"]["cpu"] == "50m"
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["priorityClassName"] == "system-cluster-critical"


def test_cluster_scope_watches_all_namespaces_with_one_cluster_role(helm_template):
    objects = helm_template()
    assert "--all-namespaces" in operator_container(objects)["args"]
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    (role,) = by_kind(objects, "ClusterRole")
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rmjob-operator", "namespace": "rmjob-system"}]
    assert {"rmjob.dev", "batch", "kubeflow.org"} <= {g for rule in role["rules"] for g in rule["apiGroups"]}


def test_namespace_scope_grants_roles_only_in_watched_namespaces(helm_template):
    objects = helm_template(*VALUE_SETS["namespace-scope"])
    args = operator_container(objects)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args

    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")) == ["team-a", "team-b"]
    # Only cluster-scoped reads stay cluster-wide (kopf follows the watched namespaces).
    (cluster_role,) = by_kind(objects, "ClusterRole")
    assert [r["resources"] for r in cluster_role["rules"]] == [["customresourcedefinitions"], ["namespaces"]]
    assert all(rule["apiGroups"] != ["apiextensions.k8s.io"] for rule in roles[0]["rules"])


def test_watched_namespaces_get_roles_even_with_cluster_scope(helm_template):
    """An operator confined to some namespaces holds no rights in the others (the confused
    deputy of issue 14 reaches only as far as the operator's RBAC)."""
    objects = helm_template("--set", "watchNamespaces={team-a}")
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == ["team-a"]
    (cluster_role,) = by_kind(objects, "ClusterRole")
    assert [r["resources"] for r in cluster_role["rules"]] == [["customresourcedefinitions"], ["namespaces"]]


def test_namespace_scope_defaults_to_the_release_namespace(helm_template):
    objects = helm_template("--set", "rbac.scope=namespace")
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == ["rmjob-system"]
    assert "--namespace=rmjob-system" in operator_container(objects)["args"]


def test_peering_adds_the_peering_object_and_its_permissions(helm_template):
    objects = helm_template(*VALUE_SETS["peering-ha"])
    assert "--peering=rmjob-operator" in operator_container(objects)["args"]
    assert [p["metadata"]["name"] for p in by_kind(objects, "ClusterKopfPeering")] == ["rmjob-operator"]
    (role,) = by_kind(objects, "ClusterRole")
    assert {"resources": ["clusterkopfpeerings"], "apiGroups": ["kopf.dev"],
            "verbs": ["get", "list", "watch", "patch"]} in role["rules"]

    objects = helm_template(*VALUE_SETS["peering-ha"], *VALUE_SETS["namespace-scope"])
    assert sorted(p["metadata"]["namespace"] for p in by_kind(objects, "KopfPeering")) == ["team-a", "team-b"]


def test_trainer_service_account_may_only_patch_job_status(helm_template):
    objects = helm_template(*VALUE_SETS["trainer-account"])
    (account,) = [a for a in by_kind(objects, "ServiceAccount") if a["metadata"]["namespace"] == "ml"]
    (role,) = by_kind(objects, "Role")
    assert role["metadata"] == {**role["metadata"], "name": "rmjob-trainer", "namespace": "ml"}
    assert role["rules"] == [{"apiGroups": ["rmjob.dev"], "resources": ["rewardmodeljobs/status"], "verbs": ["patch"]}]
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "ml"}]


@pytest.mark.parametrize("flags, error", [
    (["--set", "replicaCount=-1"], "/replicaCount"),
    (["--set-string", "replicaCount=two"], "/replicaCount"),
    (["--set", "rbac.scope=cluster-wide"], "/rbac/scope"),
    (["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
    (["--set", "replicaCount=2"], "needs peering.enabled=true"),
    (["--set", "metrics.port=8080"], "metrics.port must differ from probePort"),
    (["--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
     "metrics.serviceMonitor.enabled needs metrics.enabled=true"),
    (["--set", "metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
])
def test_bad_values_are_rejected(tools, flags, error):
    result = run(tools / "helm", "template", "r", CHART, *flags, check=False)
    assert result.returncode != 0
    assert error in result.stderr


def test_notes_render(tools):
    result = run(tools / "helm", "install", "r", CHART, "--dry-run=client", "--namespace", "ml")
    assert "reconciles RewardModelJobs in all namespaces" in result.stdout


def test_chart_crd_is_the_generated_one():
    assert filecmp.cmp(CHART / "crds" / "rewardmodeljobs.yaml", MANIFESTS / "crd.yaml", shallow=False), (
        "charts/rmjob-operator/crds/rewardmodeljobs.yaml differs from manifests/crd.yaml: run `make crd`"
    )


def admission_verdict(policy: dict, job: dict) -> list[str]:
    """The messages of the policy's failing validations for ``job`` (empty: admitted), evaluated
    with cel-python as the API server's ValidatingAdmissionPolicy plugin evaluates them on a
    create (``object`` is the job as sent, ``oldObject`` null, ``variables`` computed first; a rule that cannot evaluate counts as a denial,
    as with failurePolicy Fail)."""
    env = celpy.Environment()
    activation = {"object": celpy.json_to_cel(job), "oldObject": celpy.json_to_cel(None),
                  "request": celpy.json_to_cel({"operation": "CREATE"})}
    variables = {}
    for variable in policy["spec"].get("variables", []):  # in order: each may use the ones before
        program = env.program(env.compile(variable["expression"]))
        variables[variable["name"]] = program.evaluate({**activation, "variables": celpy.json_to_cel(variables)})
    activation["variables"] = celpy.json_to_cel(variables)
    failures = []
    for validation in policy["spec"]["validations"]:
        try:
            result = env.program(env.compile(validation["expression"])).evaluate(activation)
        except celpy.CELEvalError:
            result = False
        if isinstance(result, Exception) or not result:
            failures.append(validation["message"])
    return failures


def rewardmodeljob(name: str = "rm", **resources) -> dict:
    return {"apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob", "metadata": {"name": name, "namespace": "ml"},
            "spec": {"trainer": {"modelNameOrPath": "m", "datasetMixer": {"d": 1.0}}, "resources": resources}}


def test_admission_policy_limits_service_accounts_and_forbids_host_path(helm_template):
    """Emulates the API server admitting RewardModelJobs under the chart's ValidatingAdmissionPolicy.
    Also worth running against the real control plane (kubectl apply of the same jobs)."""
    objects = helm_template("--set", "admissionPolicy.allowedServiceAccounts={team-sa}",
                            "--set", "trainerServiceAccount.create=true")
    (policy,) = by_kind(objects, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["rewardmodeljobs"]

    pvc = {"name": "out", "persistentVolumeClaim": {"claimName": "rm-out"}}
    for allowed in (rewardmodeljob(), rewardmodeljob(serviceAccountName="rm-trainer", volumes=[pvc]),
                    rewardmodeljob(serviceAccountName="team-sa"), rewardmodeljob(serviceAccountName="rmjob-trainer")):
        assert admission_verdict(policy, allowed) == [], allowed
    host = {"name": "host", "hostPath": {"path": "/var/run/docker.sock"}}
    assert admission_verdict(policy, rewardmodeljob(volumes=[pvc, host])) == [
        "spec.resources.volumes must not use hostPath"]
    for account in ("default", "rmjob-operator", "other-job-trainer"):
        (message,) = admission_verdict(policy, rewardmodeljob(serviceAccountName=account))
        assert message.startswith("spec.resources.serviceAccountName must be the job's own NAME-trainer account")


def test_admission_policy_binds_to_the_watched_namespaces(helm_template):
    (binding,) = by_kind(helm_template(*VALUE_SETS["namespace-scope"]), "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]
    (binding,) = by_kind(helm_template(), "ValidatingAdmissionPolicyBinding")
    assert "matchResources" not in binding["spec"]  # cluster scope: every namespace
    assert not by_kind(helm_template("--set", "admissionPolicy.enabled=false"), "ValidatingAdmissionPolicy")


def test_metrics_are_served_on_their_own_port_behind_a_service(helm_template):
    objects = helm_template()
    container = operator_container(objects)
    assert "--metrics-address=0.0.0.0:9090" in container["args"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    (service,) = [s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-metrics")]
    (deployment,) = by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]  # needs the Prometheus Operator


def test_metrics_can_be_turned_off(helm_template):
    objects = helm_template(*VALUE_SETS["no-metrics"])
    assert not any(a.startswith("--metrics-address") for a in operator_container(objects)["args"])
    assert not [s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-metrics")]


def test_service_monitor_scrapes_the_metrics_service(helm_template):
    objects = helm_template(*SERVICE_MONITOR)
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (service,) = [s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    # Only the metrics Service matches (not, say, a headless one of the operator's own).
    assert [s["metadata"]["name"] for s in by_kind(objects, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()] == \
        [service["metadata"]["name"]]
