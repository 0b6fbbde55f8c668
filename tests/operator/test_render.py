"""render_children: valid Kubernetes objects, wired together as the design says."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
import yaml
from kube_schema import REPO, schema_errors
from pod_security import restricted_violations
from test_invalid_specs import FULL, MINIMAL, SECRET, resource, with_changes

from rmjob_operator import render
from rmjob_operator.spec import InvalidSpec

K8S_VERSION = "1.33"
PYTORCHJOB_CRD = REPO.parent / "shared" / "reference" / "crds" / "kubeflow.org_pytorchjobs.v1.9.0.yaml"
WANDB = {"wandb": {"apiKeySecretRef": {"name": "wandb", "key": "api-key"}}}


def job(spec: dict | None = None, name: str = "rm-sentiment") -> dict:
    body = resource(copy.deepcopy(spec or MINIMAL), name)
    body["metadata"].update(uid="0b4c1a8e-1111-2222-3333-444455556666", generation=1)
    return body


def by_kind(children: list[dict]) -> dict[str, dict]:
    return {child["kind"]: child for child in children}


def pod_spec(workload: dict, replica: str = "Master") -> dict:
    if workload["kind"] == "PyTorchJob":
        return workload["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def env_of(workload: dict) -> dict[str, dict]:
    [container] = pod_spec(workload)["containers"]
    return {env["name"]: env for env in container["env"]}


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict:
    if not PYTORCHJOB_CRD.exists():
        pytest.skip(f"Kubeflow PyTorchJob CRD not found at {PYTORCHJOB_CRD} (shared/ sits beside the repo)")
    crd = yaml.safe_load(PYTORCHJOB_CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


SPECS = {
    "minimal": MINIMAL,
    "full": FULL,
    "three nodes": with_changes(MINIMAL, resources={"nodes": 3, "gpusPerNode": 4}, tracking=WANDB),
    "cpu": with_changes(MINIMAL, resources={"gpusPerNode": 0}),
}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_pytorchjob_validates_against_the_kubeflow_crd(pytorchjob_schema, spec):
    workload = by_kind(render.render_children(job(spec), "pytorchjob"))["PyTorchJob"]
    assert schema_errors(pytorchjob_schema, workload) == []


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_core_objects_validate_with_kubernetes_schemas(spec, backend):
    for child in render.render_children(job(spec), backend):
        if child["kind"] == "PyTorchJob":  # its pod templates are core objects too
            for replica in child["spec"]["pytorchReplicaSpecs"].values():
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                            "template": replica["template"]}
                kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_children_in_creation_order():
    def kinds(backend: str) -> list[str]:
        return [c["kind"] for c in render.render_children(job(), backend)]

    assert kinds("pytorchjob") == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PyTorchJob"]
    assert kinds("job") == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Service", "Job"]


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_names_labels_namespace_and_no_owner_references(backend):
    for child in render.render_children(job(), backend):
        meta = child["metadata"]
        assert meta["namespace"] == "default"
        assert meta["name"] in {"rm-sentiment", "rm-sentiment-config", "rm-sentiment-trainer"}
        assert meta["labels"] == {"app.kubernetes.io/name": "rmjob", "app.kubernetes.io/managed-by": "rmjob-operator",
                                  "rmjob.dev/job-name": "rm-sentiment"}
        assert "ownerReferences" not in meta


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_workload_ref_names_the_rendered_workload(backend):
    ref = render.workload_ref(job(), backend)
    workload = render.render_children(job(), backend)[-1]
    assert ref == {"apiVersion": workload["apiVersion"], "kind": workload["kind"], "name": "rm-sentiment"}


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_rendering_is_deterministic(backend):
    reordered = job(FULL)
    reordered["spec"] = dict(reversed(list(reordered["spec"].items())))
    first = render.render_children(job(FULL), backend)
    assert render.render_children(job(FULL), backend) == first
    assert json.dumps(render.render_children(reordered, backend)) == json.dumps(first)


def test_pytorchjob_master_and_workers():
    workload = by_kind(render.render_children(job(SPECS["three nodes"]), "pytorchjob"))["PyTorchJob"]
    replicas = workload["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert workload["spec"]["nprocPerNode"] == "4"
    [container] = pod_spec(workload, "Worker")["containers"]
    assert container["name"] == "pytorch"
    assert container["command"][:3] == ["rmjob-torchrun", "--master_addr=$(MASTER_ADDR)",
                                        "--master_port=$(MASTER_PORT)"]
    assert container["command"][3:] == ["-m", "rmjob_trainer", "--config", "/etc/rmjob/trainer.yaml"]
    assert container["ports"][0]["name"] == "pytorchjob-port"


def test_single_node_pytorchjob_has_no_worker():
    workload = by_kind(render.render_children(job(), "pytorchjob"))["PyTorchJob"]
    assert list(workload["spec"]["pytorchReplicaSpecs"]) == ["Master"]


def test_pytorchjob_run_policy():
    spec = with_changes(MINIMAL, runPolicy={"backoffLimit": 3, "activeDeadlineSeconds": 600,
                                            "ttlSecondsAfterFinished": 60, "suspend": True})
    workload = by_kind(render.render_children(job(spec), "pytorchjob"))["PyTorchJob"]
    assert workload["spec"]["runPolicy"] == {"backoffLimit": 3, "activeDeadlineSeconds": 600,
                                             "ttlSecondsAfterFinished": 60, "suspend": True,
                                             "cleanPodPolicy": "Running"}


def test_indexed_job_and_headless_service():
    children = by_kind(render.render_children(job(SPECS["three nodes"]), "job"))
    service, workload = children["Service"], children["Job"]
    assert service["metadata"]["name"] == "rm-sentiment"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"rmjob.dev/job-name": "rm-sentiment"}
    assert workload["spec"]["template"]["metadata"]["labels"]["rmjob.dev/job-name"] == "rm-sentiment"
    spec = workload["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert pod_spec(workload)["subdomain"] == service["metadata"]["name"]
    assert pod_spec(workload)["restartPolicy"] == "Never"  # required by podFailurePolicy
    [container] = pod_spec(workload)["containers"]
    assert container["command"] == ["rmjob-torchrun", "-m", "rmjob_trainer", "--config", "/etc/rmjob/trainer.yaml"]


def test_job_backend_node_rank_and_rendezvous_env():
    env = env_of(by_kind(render.render_children(job(SPECS["three nodes"]), "job"))["Job"])
    assert env["PET_NNODES"]["value"] == "3"
    assert env["PET_NPROC_PER_NODE"]["value"] == "4"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["PET_MASTER_ADDR"]["value"] == "rm-sentiment-0.rm-sentiment"
    assert env["PET_MASTER_PORT"]["value"] == "29500"


def job_outcome(rules: list[dict], exit_code: int, disrupted: bool = False) -> str:
    """What a Job's podFailurePolicy does with a failed pod (the first matching rule)."""
    for rule in rules:
        if disrupted and rule.get("onPodConditions") == [{"type": "DisruptionTarget", "status": "True"}]:
            return rule["action"]
        codes = rule.get("onExitCodes")
        if codes and (exit_code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"


def test_job_backend_fails_the_gang_together_and_retries_preemptions():
    spec = with_changes(MINIMAL, runPolicy={"backoffLimit": 2, "activeDeadlineSeconds": 600,
                                            "ttlSecondsAfterFinished": 60, "suspend": True})
    workload = by_kind(render.render_children(job(spec), "job"))["Job"]["spec"]
    assert (workload["backoffLimit"], workload["activeDeadlineSeconds"]) == (2, 600)
    assert (workload["ttlSecondsAfterFinished"], workload["suspend"]) == (60, True)
    rules = workload["podFailurePolicy"]["rules"]
    assert all(r["onExitCodes"]["containerName"] == "pytorch" for r in rules if "onExitCodes" in r)
    assert all(len(r["onExitCodes"]["values"]) <= 255 for r in rules if "onExitCodes" in r)  # the API's limit
    # Preempted (rmjob-torchrun's 200, checkpoint written) or disrupted by the cluster: replaced,
    # not counted. A trainer error: the whole Job fails at once. A signal (OOM kill): counted.
    from rmjob_trainer.preemption import EXIT_PREEMPTED

    assert job_outcome(rules, EXIT_PREEMPTED) == "Ignore"
    assert job_outcome(rules, 137, disrupted=True) == "Ignore"
    assert [job_outcome(rules, code) for code in (1, 2, 127)] == ["FailJob"] * 3
    assert [job_outcome(rules, code) for code in (137, 143)] == ["Count"] * 2


def test_several_nodes_count_every_failure_since_a_lost_node_makes_the_others_exit_1():
    """The lost node's own pod is disrupted (Ignore); the ranks on the other nodes fail their
    next collective and exit 1, which must not fail the Job at once when backoffLimit allows a retry."""
    from rmjob_trainer.preemption import EXIT_PREEMPTED

    workload = by_kind(render.render_children(job(SPECS["three nodes"]), "job"))["Job"]["spec"]
    rules = workload["podFailurePolicy"]["rules"]
    assert job_outcome(rules, 137, disrupted=True) == "Ignore"
    assert job_outcome(rules, EXIT_PREEMPTED) == "Ignore"
    assert [job_outcome(rules, code) for code in (1, 2, 127, 137)] == ["Count"] * 4


def test_pytorchjob_retries_only_what_is_not_a_trainer_error():
    """Kubeflow's ExitCode policy: 1-127 permanent, 128-255 retried (rmjob-torchrun's 200 included)."""
    workload = by_kind(render.render_children(job(SPECS["three nodes"]), "pytorchjob"))["PyTorchJob"]["spec"]
    assert {r["restartPolicy"] for r in workload["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    from rmjob_trainer.preemption import EXIT_PREEMPTED

    assert EXIT_PREEMPTED == render.EXIT_PREEMPTED and 128 <= EXIT_PREEMPTED <= 255


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_pods_run_the_launcher_that_reports_preemption(backend):
    import shutil

    [container] = pod_spec(render.render_children(job(), backend)[-1])["containers"]
    assert container["command"][0] == "rmjob-torchrun"
    assert shutil.which("rmjob-torchrun") or (REPO / ".venv" / "bin" / "rmjob-torchrun").exists()


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_termination_grace_period_and_torchrun_shutdown_timeout(backend):
    default = render.render_children(job(), backend)[-1]
    assert pod_spec(default)["terminationGracePeriodSeconds"] == 300
    assert env_of(default)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "290"
    spec = with_changes(MINIMAL, runPolicy={"terminationGracePeriodSeconds": 900})
    workload = render.render_children(job(spec), backend)[-1]
    assert pod_spec(workload)["terminationGracePeriodSeconds"] == 900
    assert env_of(workload)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "890"
    short = render.render_children(job(with_changes(MINIMAL, runPolicy={"terminationGracePeriodSeconds": 0})),
                                   backend)[-1]
    assert env_of(short)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "1"


def output_volume(workload: dict) -> tuple[dict, dict]:
    pod = pod_spec(workload)
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/output"]
    return {v["name"]: v for v in pod["volumes"]}[mount["name"]], mount


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_created_claim_is_owned_mounted_at_output_and_turns_checkpoints_on(backend):
    spec = with_changes(MINIMAL, storage={"size": "50Gi", "storageClassName": "fast"})
    children = render.render_children(job(spec), backend)
    claim = children[0]  # created first: the pods mount it
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "rm-sentiment-output"
    assert claim["metadata"]["labels"]["rmjob.dev/job-name"] == "rm-sentiment"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}},
                             "storageClassName": "fast"}
    assert not render.is_retained(claim)
    volume, mount = output_volume(children[-1])
    assert volume == {"name": "rmjob-output", "persistentVolumeClaim": {"claimName": "rm-sentiment-output"}}
    assert "subPath" not in mount
    config = yaml.safe_load(by_kind(children)["ConfigMap"]["data"]["trainer.yaml"])
    assert config["checkpointing_steps"] == 100 and config.get("resume", True) is True
    assert config["output_dir"] == "/output"


def test_claim_for_several_nodes_is_read_write_many_and_may_be_retained():
    spec = with_changes(MINIMAL, resources={"nodes": 2}, storage={"size": "1Ti", "retainOnDelete": True})
    claim = render.render_children(job(spec), "job")[0]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert render.is_retained(claim)


def test_existing_claim_is_mounted_not_created_and_an_explicit_interval_wins():
    spec = with_changes(MINIMAL, storage={"existingClaim": "team-rm", "subPath": "runs/a"},
                        trainer={"checkpointingSteps": 7})
    children = render.render_children(job(spec), "job")
    assert "PersistentVolumeClaim" not in by_kind(children)
    volume, mount = output_volume(children[-1])
    assert volume["persistentVolumeClaim"] == {"claimName": "team-rm"} and mount["subPath"] == "runs/a"
    assert yaml.safe_load(by_kind(children)["ConfigMap"]["data"]["trainer.yaml"])["checkpointing_steps"] == 7


def test_no_storage_no_claim_and_no_default_checkpoints():
    children = render.render_children(job(), "job")
    assert "PersistentVolumeClaim" not in by_kind(children)
    assert "checkpointing_steps" not in yaml.safe_load(by_kind(children)["ConfigMap"]["data"]["trainer.yaml"])


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_secrets_only_by_reference(backend):
    spec = with_changes(FULL)
    env = env_of(render.render_children(job(spec), backend)[-1])
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": SECRET}}
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}
    for child in render.render_children(job(spec), backend):
        assert child["kind"] != "Secret"


def test_no_secret_env_without_refs():
    env = env_of(by_kind(render.render_children(job(), "job"))["Job"])
    assert "HF_TOKEN" not in env and "WANDB_API_KEY" not in env
    assert env["RMJOB_JOB_NAME"]["value"] == "rm-sentiment" and env["RMJOB_NAMESPACE"]["value"] == "default"


def test_user_env_comes_before_the_operators_and_may_move_caches():
    spec = with_changes(MINIMAL, resources={"env": [{"name": "HF_HOME", "value": "/data/hf"}]})
    [container] = pod_spec(by_kind(render.render_children(job(spec), "job"))["Job"])["containers"]
    names = [env["name"] for env in container["env"]]
    assert len(names) == len(set(names))
    assert env_of(by_kind(render.render_children(job(spec), "job"))["Job"])["HF_HOME"]["value"] == "/data/hf"
    assert names.index("HF_HOME") < names.index("RMJOB_JOB_NAME") < names.index("PET_NODE_RANK")


def test_pod_settings_from_the_spec():
    workload = by_kind(render.render_children(job(FULL), "pytorchjob"))["PyTorchJob"]
    pod = pod_spec(workload)
    res = FULL["resources"]
    assert pod["nodeSelector"] == res["nodeSelector"]
    assert pod["tolerations"] == res["tolerations"]
    assert pod["affinity"] == res["affinity"]
    assert pod["priorityClassName"] == "training"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "rm-sentiment-trainer"
    # The trainer image's user, and mounted volumes writable by it.
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["image"] == "registry.example/rmjob-trainer:1"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["resources"] == {"requests": {"cpu": "32", "memory": "400Gi"},
                                      "limits": {"memory": "400Gi", "nvidia.com/gpu": 8}}


def test_volumes_config_shm_caches_and_user_output():
    pod = pod_spec(by_kind(render.render_children(job(FULL), "job"))["Job"])
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/rmjob"]]["configMap"] == {"name": "rm-sentiment-config"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert "emptyDir" in volumes[mounts["/cache"]]
    assert volumes[mounts["/output"]] == {"name": "out", "persistentVolumeClaim": {"claimName": "rm-out"}}
    assert "rmjob-output" not in volumes


def test_output_is_an_empty_dir_by_default():
    pod = pod_spec(by_kind(render.render_children(job(), "job"))["Job"])
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert {v["name"]: v for v in pod["volumes"]}[mounts["/output"]]["emptyDir"] == {}


def test_cpu_job_requests_no_gpu():
    workload = by_kind(render.render_children(job(SPECS["cpu"]), "pytorchjob"))["PyTorchJob"]
    assert workload["spec"]["nprocPerNode"] == "1"
    assert pod_spec(workload)["containers"][0]["resources"] == {}


def test_image_default_and_override():
    def image(body: dict, **kwargs) -> str:
        return pod_spec(render.render_children(body, "job", **kwargs)[-1])["containers"][0]["image"]

    assert image(job()) == render.DEFAULT_IMAGE
    assert image(job(), default_image="registry.local/trainer:dev") == "registry.local/trainer:dev"
    assert image(job(FULL), default_image="registry.local/trainer:dev") == "registry.example/rmjob-trainer:1"


def test_service_account_override():
    spec = with_changes(MINIMAL, resources={"serviceAccountName": "team-sa"})
    assert pod_spec(render.render_children(job(spec), "job")[-1])["serviceAccountName"] == "team-sa"


def test_trainer_role_may_only_patch_this_jobs_status():
    children = render.render_children(job(), "job")
    role = next(c for c in children if c["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": ["rmjob.dev"], "resources": ["rewardmodeljobs/status"],
                              "resourceNames": ["rm-sentiment"], "verbs": ["patch"]}]
    binding = next(c for c in children if c["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rm-sentiment-trainer", "namespace": "default"}]


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
def test_kueue_queue_label_only_with_a_queue(backend):
    labelled = render.render_children(job(FULL), backend)[-1]["metadata"]["labels"]
    assert labelled["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "kueue.x-k8s.io/queue-name" not in render.render_children(job(), backend)[-1]["metadata"]["labels"]


def test_config_map_holds_trainer_yaml_and_deepspeed_json():
    config_map = by_kind(render.render_children(job(FULL), "job"))["ConfigMap"]
    assert config_map["metadata"]["name"] == "rm-sentiment-config"
    trainer = yaml.safe_load(config_map["data"]["trainer.yaml"])
    assert trainer["deepspeed"] == "/etc/rmjob/deepspeed.json"
    assert trainer["per_device_train_batch_size"] == 16
    ds = json.loads(config_map["data"]["deepspeed.json"])
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 4 * 2 * 8
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 1.0  # from the raw override


def test_raw_deepspeed_override_is_merged_but_cannot_change_batch_sizes():
    spec = with_changes(MINIMAL, deepspeed={"stage": 2, "config": {
        "zero_optimization": {"reduce_bucket_size": 5e8}, "train_micro_batch_size_per_gpu": 99}})
    ds = json.loads(by_kind(render.render_children(job(spec), "job"))["ConfigMap"]["data"]["deepspeed.json"])
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert ds["zero_optimization"]["stage"] == 2  # deep merge keeps the generated keys
    assert ds["train_micro_batch_size_per_gpu"] == 1


def test_invalid_specs_and_names_raise_invalid_spec():
    with pytest.raises(InvalidSpec, match="spec.deepspeed.stage"):
        render.render_children(job(with_changes(MINIMAL, deepspeed={"stage": 1})), "job")
    with pytest.raises(InvalidSpec, match="metadata.name"):
        render.render_children(job(name="Bad_Name"), "job")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        render.render_children(job(), "auto")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["pytorchjob", "job"])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_trainer_pods_pass_pod_security_restricted(backend, spec):
    """Emulates the PodSecurity admission plugin of a namespace enforcing ``restricted``: the
    Job or PyTorchJob controller's pod creations would be refused for any violation.
    Also worth running against the real control plane (a namespace with the enforce label)."""
    workload = render.render_children(job(spec), backend)[-1]
    replicas = ["Master", "Worker"] if workload["kind"] == "PyTorchJob" and "Worker" in (
        workload["spec"]["pytorchReplicaSpecs"]) else ["Master"]
    for replica in replicas:
        assert restricted_violations(pod_spec(workload, replica)) == []


def test_pod_security_check_finds_what_restricted_refuses():
    pod = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
           "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}
    assert restricted_violations(pod) == [
        "volume h: hostPath", "c: allowPrivilegeEscalation != false", "c: capabilities.drop does not include ALL",
        "c: capabilities.add beyond NET_BIND_SERVICE"]
