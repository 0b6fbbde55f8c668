"""manifests/: the kubectl install (crd + rbac + operator), consistent with the Helm chart."""

from __future__ import annotations

import kubernetes_validate
import yaml

from conftest import MANIFESTS, by_kind, load_all, run

K8S_VERSION = kubernetes_validate.latest_version()


def manifest(name: str) -> list[dict]:
    return load_all((MANIFESTS / name).read_text())


def test_kustomization_builds_crd_rbac_and_operator(tools):
    objects = load_all(run(tools / "kubectl", "kustomize", MANIFESTS).stdout)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Namespace",
                            "ServiceAccount", "Deployment"])
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
    assert kustomization["resources"] == ["crd.yaml", "rbac.yaml", "operator.yaml"]
