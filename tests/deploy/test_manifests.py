"""manifests/: the kubectl install (crd + rbac + operator), consistent with the Helm chart."""

from __future__ import annotations

import kubernetes_validate
import yaml

from conftest import CHART, MANIFESTS, by_kind, load_all, run

K8S_VERSION = kubernetes_validate.latest_version()


def manifest(name: str) -> list[dict]:
    return load_all((MANIFESTS / name).read_text())


def test_kustomization_builds_crd_rbac_and_operator(tools):
    objects = load_all(run(tools / "kubectl", "kustomize", MANIFESTS).stdout)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["CustomResourceDefinition", "CustomResourceDefinition", "CustomResourceDefinition",
                            "ClusterRole", "ClusterRoleBinding", "Namespace", "ServiceAccount", "Deployment",
                            "Service"])
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_rbac_rules_match_the_chart(helm_template):
    (chart_role,) = by_kind(helm_template(), "ClusterRole")
    (role,) = by_kind(manifest("rbac.yaml"), "ClusterRole")
    assert role["rules"] == chart_role["rules"]


def test_binding_names_the_operator_account():
    (binding,) = by_kind(manifest("rbac.yaml"), "ClusterRoleBinding")
    (account,) = by_kind(manifest("operator.yaml"), "ServiceAccount")
    (deployment,) = by_kind(manifest("operator.yaml"), "Deployment")
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"],
               "namespace": account["metadata"]["namespace"]}
    assert binding["subjects"] == [subject]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == subject["name"]
    assert deployment["metadata"]["namespace"] == subject["namespace"] == "rmjob-system"


def test_operator_pod_matches_the_chart_defaults(helm_template):
    (chart_deployment,) = by_kind(helm_template(), "Deployment")
    (deployment,) = by_kind(manifest("operator.yaml"), "Deployment")
    chart_pod, pod = chart_deployment["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]
    # Names and labels differ (Helm's release labels); the pod itself must not.
    for key in ("securityContext", "volumes", "containers"):
        assert pod[key] == chart_pod[key], key
    assert deployment["spec"]["strategy"] == chart_deployment["spec"]["strategy"]


def test_operator_namespace_enforces_restricted_pod_security():
    (namespace,) = by_kind(manifest("operator.yaml"), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["crd.yaml", "kopf-peerings.yaml", "rbac.yaml", "operator.yaml"]


def test_kopf_peering_crds_are_the_charts():
    """Replicas with --peering need kopf's peering resources; both installs ship them."""
    assert (MANIFESTS / "kopf-peerings.yaml").read_bytes() == (CHART / "crds" / "kopf-peerings.yaml").read_bytes()
    names = {crd["spec"]["names"]["plural"] for crd in manifest("kopf-peerings.yaml")}
    assert names == {"kopfpeerings", "clusterkopfpeerings"}
    for crd in manifest("kopf-peerings.yaml"):
        assert crd["spec"]["group"] == "kopf.dev"  # where kopf 1.29+ looks first
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_admission_policy_is_the_charts_default(helm_template):
    """manifests/admission-policy.yaml is the chart's policy for its default values (names
    and Helm's labels aside)."""
    chart = helm_template("--show-only", "templates/admission-policy.yaml")
    ours = manifest("admission-policy.yaml")
    assert [o["kind"] for o in ours] == [o["kind"] for o in chart]
    for mine, theirs in zip(ours, chart):
        kubernetes_validate.validate(mine, K8S_VERSION, strict=True)
        mine_spec = {k: v for k, v in mine["spec"].items() if k != "policyName"}
        theirs_spec = {k: v for k, v in theirs["spec"].items() if k != "policyName"}
        if mine["kind"] == "ValidatingAdmissionPolicy":
            for validation in (*mine_spec["validations"], *theirs_spec["validations"]):
                del validation["message"]  # the chart names the allowed list when there is one
        assert mine_spec == theirs_spec
