"""The RewardModelJob CRD on a real API server: installed by kubectl and by helm, printer
columns as kubectl shows them, and every invalid spec refused by the API server itself (schema
and CEL really evaluated) naming the field parse_spec names; no example refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
import yaml
from operator_harness import CHART, CRD_MANIFEST, HELM, REPO
from rmj import GROUP_PATH, get_json, invalid_specs, rmj, wait_established, wait_until

from rmjob_operator.spec import InvalidSpec, check_name, parse_spec

pytestmark = pytest.mark.cluster


def server_verdict(cluster, namespace: str, job: dict) -> str | None:
    """The API server's refusal of creating ``job`` (dry run, strict field validation as
    kubectl's default), or None when it would accept it."""
    path = f"{GROUP_PATH}/namespaces/{namespace}/rewardmodeljobs?dryRun=All&fieldValidation=Strict"
    try:
        cluster.api("POST", path, job)
    except Exception as error:  # ClusterError carries the server's message
        return str(error)
    return None


@pytest.mark.parametrize(("spec", "field"), invalid_specs.INVALID.values(), ids=invalid_specs.INVALID.keys())
def test_the_api_server_refuses_each_invalid_spec_naming_the_parse_spec_field(cluster, rmj_crd, spec, field):
    refusal = server_verdict(cluster, "default", rmj("rm-invalid", "default", spec))
    assert refusal is not None, "the API server accepted it"
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    assert caught.value.field == field
    # 422 Invalid (schema, CEL) or 400 BadRequest (strict decoding of an unknown field).
    assert "HTTP 422" in refusal or "HTTP 400" in refusal, refusal
    # The field itself, not one below it: "FIELD: Invalid value" or an unknown "FIELD".
    assert f"{field}: " in refusal or f'unknown field "{field}"' in refusal, refusal


@pytest.mark.parametrize("name", ["RM-Job", "rm_job", "1rm", "rm-", "r" * 49])
def test_the_api_server_refuses_names_that_cannot_name_a_service(cluster, rmj_crd, name):
    refusal = server_verdict(cluster, "default", rmj(name, "default", invalid_specs.MINIMAL))
    assert refusal is not None
    with pytest.raises(InvalidSpec, match="metadata.name"):
        check_name(name)


@pytest.mark.parametrize("spec", invalid_specs.VALID.values(), ids=invalid_specs.VALID.keys())
def test_the_api_server_accepts_each_valid_spec(cluster, rmj_crd, spec):
    assert server_verdict(cluster, "default", rmj("rm-valid", "default", spec)) is None


@pytest.mark.parametrize("job", invalid_specs.example_specs())
def test_the_api_server_accepts_every_example(cluster, rmj_crd, job):
    job = {**job, "metadata": {**job["metadata"], "namespace": "default"}}
    assert server_verdict(cluster, "default", job) is None


def test_kubectl_get_rmj_shows_the_printer_columns(kubectl, cluster, rmj_crd, namespace):
    kubectl("apply", "-f", "-", input=json.dumps(rmj("rm-columns", namespace, invalid_specs.with_changes(
        invalid_specs.MINIMAL, resources={"nodes": 2, "gpusPerNode": 4}))))
    # What the operator and the trainer would write, through the status subresource.
    status = {"status": {"phase": "Running", "message": "training",
                         "metrics": {"step": 7, "totalSteps": 40, "evalAccuracy": 0.625},
                         "progress": {"percentage": 17, "estimatedRemainingSeconds": 330}}}
    kubectl("patch", "rmj", "rm-columns", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps(status))
    wide = kubectl("get", "rmj", "-n", namespace, "-o", "wide").stdout.splitlines()
    header = wide[0].split()
    assert header == ["NAME", "PHASE", "MODEL", "NODES", "GPUS/NODE", "STEP", "TOTAL", "PROGRESS", "ETA(S)", "EVAL",
                      "ACC", "MESSAGE", "AGE"], wide[0]
    row = wide[1].split()
    assert row[:10] == ["rm-columns", "Running", "EleutherAI/pythia-14m", "2", "4", "7", "40", "17", "330",
                        "0.625"], wide[1]
    assert row[10] == "training"
    narrow = kubectl("get", "rmj", "-n", namespace).stdout.splitlines()[0].split()
    assert narrow == ["NAME", "PHASE", "MODEL", "NODES", "GPUS/NODE", "STEP", "PROGRESS", "EVAL", "ACC", "AGE"]


def test_helm_installs_upgrades_and_uninstalls_the_chart_and_its_crd(kubectl, cluster, rmj_crd, tmp_path,
                                                                     namespace):
    """The chart's CRD is created by `helm install` itself. The cluster is shared and already
    has rewardmodeljobs.rmjob.dev (which helm would skip), so the chart is copied with its CRD
    under a group of its own: the same schema and rules, judged by the API server again."""
    chart = tmp_path / "rmjob-operator"
    shutil.copytree(CHART, chart)
    group = f"t{uuid.uuid4().hex[:8]}.rmjob.dev"
    crd_file = chart / "crds" / "rewardmodeljobs.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    assert crd == yaml.safe_load(CRD_MANIFEST.read_text())  # the chart ships manifests/crd.yaml
    crd["metadata"]["name"] = f"rewardmodeljobs.{group}"
    crd["spec"]["group"] = group
    crd_file.write_text(yaml.safe_dump(crd))
    release = f"rmj-{uuid.uuid4().hex[:6]}"
    env_kubeconfig = ["--kubeconfig", str(cluster.kubeconfig)]

    def helm(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(HELM), *args, *env_kubeconfig], capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr.strip()}"
        return result

    try:
        # Confined to this test's namespace: namespaced Roles and admission-policy binding.
        helm("install", release, str(chart), "-n", namespace, "--set", f"watchNamespaces={{{namespace}}}")
        wait_established(kubectl, f"rewardmodeljobs.{group}")
        assert get_json(kubectl, "deployment", "-n", namespace, "-l", f"app.kubernetes.io/instance={release}")["items"]
        # The chart's admission policy (on by default) is enforced in the watched namespace.
        host_path = invalid_specs.with_changes(invalid_specs.MINIMAL, resources={
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}]})
        refusal = wait_until(lambda: server_verdict(cluster, namespace, rmj("rm-host", namespace, host_path)), 30,
                             "the chart's admission policy in force")
        assert "spec.resources.volumes must not use hostPath" in refusal, refusal
        assert server_verdict(cluster, namespace, rmj("rm-plain", namespace, invalid_specs.MINIMAL)) is None
        helm("upgrade", release, str(chart), "-n", namespace, "--set", f"watchNamespaces={{{namespace}}}",
             "--set", "replicaCount=2", "--set", "peering.enabled=true")
        deployment = get_json(kubectl, "deployment", "-n", namespace, "-l",
                              f"app.kubernetes.io/instance={release}")["items"][0]
        assert deployment["spec"]["replicas"] == 2
        assert any(arg.startswith("--peering=") for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"])
        assert get_json(kubectl, "kopfpeerings", "-n", namespace)["items"]
        assert "deployed" in helm("status", release, "-n", namespace).stdout
        helm("uninstall", release, "-n", namespace)
        assert not get_json(kubectl, "deployment", "-n", namespace)["items"]
        assert not get_json(kubectl, "clusterrole", "-l", f"app.kubernetes.io/instance={release}")["items"]
        wait_until(lambda: server_verdict(cluster, namespace, rmj("rm-host", namespace, host_path)) is None, 30,
                   "the admission policy gone with the release")
        # Helm never deletes CRDs: the jobs outlive an uninstall.
        assert get_json(kubectl, f"crd/rewardmodeljobs.{group}")
    finally:
        subprocess.run([str(HELM), "uninstall", release, "-n", namespace, *env_kubeconfig], capture_output=True)
        kubectl("delete", "crd", f"rewardmodeljobs.{group}", "--wait=false", check=False)


def test_kopf_peering_crds_are_accepted(kubectl):
    for path in (REPO / "manifests" / "kopf-peerings.yaml", CHART / "crds" / "kopf-peerings.yaml"):
        kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=rmjob-tests", "-f", str(path))
    wait_until(lambda: kubectl("get", "kopfpeerings", "-A", check=False).returncode == 0, 60,
               "kopfpeerings served")
