"""Pure rendering: a RewardModelJob object -> the Kubernetes objects that run it.

No I/O and no kopf here: the handlers read the job, call :func:`render_children`, adopt the
result (ownerReferences) and apply it. Children of job ``NAME``, in creation order:

- with ``spec.storage.size``: PersistentVolumeClaim ``NAME-output``, mounted at /output (owned
  by the job unless ``retainOnDelete``: :func:`is_retained` tells the handler not to adopt it);
- ConfigMap ``NAME-config``: ``trainer.yaml`` (RewardConfig keys) and ``deepspeed.json``,
  mounted at /etc/rmjob;
- ServiceAccount, Role and RoleBinding ``NAME-trainer``: rank 0 may ``patch`` this job's
  ``status`` (nothing else), to report progress in ``status.training``;
- backend ``job`` only: headless Service ``NAME``, giving pod ``NAME-0`` the stable DNS name
  ``NAME-0.NAME`` that the other nodes rendezvous at;
- the workload ``NAME``: a Kubeflow PyTorchJob or an Indexed batch/v1 Job.

The trainer image is ``spec.resources.image``, else the ``default_image`` argument (the
handler passes the operator's ``RMJOB_TRAINER_IMAGE``), else :data:`DEFAULT_IMAGE`.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

import yaml

from rmjob_operator import API_VERSION, GROUP, PLURAL
from rmjob_operator.spec import (
    CONFIG_MOUNT_PATH,
    DEEPSPEED_CONFIG_FILE,
    OPERATOR_VOLUME_PREFIX,
    OUTPUT_MOUNT_PATH,
    SHM_MOUNT_PATH,
    TRAINER_CONFIG_FILE,
    RewardModelJobSpec,
    check_name,
    parse_spec,
)

Backend = Literal["pytorchjob", "job"]

DEFAULT_IMAGE = "ghcr.io/rmjob/rmjob-trainer:0.1.0"
CONTAINER_NAME = "pytorch"  # Kubeflow finds the training container (and its port) by this name
MASTER_PORT = 29500
JOB_LABEL = "rmjob.dev/job-name"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
CACHE_MOUNT_PATH = "/cache"
# Caches the trainer writes to; the image's root filesystem may be read-only.
CACHE_ENV = {
    "HF_HOME": f"{CACHE_MOUNT_PATH}/huggingface",
    "TRITON_CACHE_DIR": f"{CACHE_MOUNT_PATH}/triton",
    "WANDB_DIR": f"{CACHE_MOUNT_PATH}/wandb",
    "WANDB_CACHE_DIR": f"{CACHE_MOUNT_PATH}/wandb",
    "WANDB_CONFIG_DIR": f"{CACHE_MOUNT_PATH}/wandb",
}
TRAIN_COMMAND = ["-m", "rmjob_trainer", "--config", f"{CONFIG_MOUNT_PATH}/{TRAINER_CONFIG_FILE}"]
# torchrun (same arguments) whose exit status says "stopped for a preemption, checkpoint written":
# torchrun's own is 1 for that as for an error (rmjob_trainer.preemption).
LAUNCHER = "rmjob-torchrun"
EXIT_PREEMPTED = 200  # rmjob_trainer.preemption.EXIT_PREEMPTED; the operator does not import the trainer's torch code
# Exit codes of a trainer error (torchrun's 1 when a rank fails, argument errors): retrying
# cannot help. 128 and above are signals (137 SIGKILL: OOM kill, a node lost): worth a retry.
TRAINER_ERROR_EXIT_CODES = list(range(1, 128))
# On a child the job must not own: the garbage collector would delete it with the job.
RETAIN_ANNOTATION = "rmjob.dev/retain-on-delete"
# torchrun gives its workers this long after SIGTERM before it SIGKILLs them (its own default
# is 30 s, shorter than a checkpoint write); the rest of the pod's grace period is its margin.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_MARGIN_SECONDS = 10


def config_map_name(name: str) -> str:
    return f"{name}-config"


def trainer_account_name(name: str) -> str:
    return f"{name}-trainer"


def output_claim_name(name: str) -> str:
    return f"{name}-output"


def is_retained(child: dict[str, Any]) -> bool:
    """Whether ``child`` outlives its job (a claim with ``retainOnDelete``): never adopt it."""
    return (child["metadata"].get("annotations") or {}).get(RETAIN_ANNOTATION) == "true"


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "rmjob",
        "app.kubernetes.io/managed-by": "rmjob-operator",
        JOB_LABEL: name,
    }


def _metadata(body: dict[str, Any], name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta = body["metadata"]
    all_labels = {**labels(meta["name"]), **(extra_labels or {})}
    return {"name": name, "namespace": meta["namespace"], "labels": all_labels}


# --- configuration ---------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(spec: RewardModelJobSpec) -> dict[str, Any]:
    """The DeepSpeed JSON for ``spec.deepspeed``, with the raw ``config`` merged over it.

    The batch sizes are always the trainer section's: DeepSpeed asserts
    ``train_batch_size == micro_batch * accumulation * world_size`` and the trainer builds its
    data loaders from the trainer section.
    """
    ds, trainer = spec.deepspeed, spec.trainer
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": True, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save_pretrained gets full weights
    config = {
        "bf16": {"enabled": ds.bf16},
        "fp16": {"enabled": trainer.mixed_precision == "fp16"},
        "zero_optimization": zero,
    }
    config = _deep_merge(config, ds.config or {})
    micro, accumulation = trainer.per_device_train_batch_size, trainer.gradient_accumulation_steps
    config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro * accumulation * spec.world_size,
    )
    return config


def _config_map(body: dict[str, Any], spec: RewardModelJobSpec) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(body, config_map_name(name)),
        "data": {
            TRAINER_CONFIG_FILE: yaml.safe_dump(spec.trainer_config(), sort_keys=True),
            DEEPSPEED_CONFIG_FILE: json.dumps(deepspeed_config(spec), indent=2, sort_keys=True) + "\n",
        },
    }


def _output_claim(body: dict[str, Any], spec: RewardModelJobSpec) -> dict[str, Any]:
    storage = spec.storage
    metadata = _metadata(body, output_claim_name(body["metadata"]["name"]))
    if storage.retain_on_delete:
        metadata["annotations"] = {RETAIN_ANNOTATION: "true"}
    claim_spec: dict[str, Any] = {
        "accessModes": spec.claim_access_modes,
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        claim_spec["storageClassName"] = storage.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": claim_spec}


# --- RBAC for the trainer's status reports --------------------------------------------------


def _rbac(body: dict[str, Any]) -> list[dict[str, Any]]:
    name = body["metadata"]["name"]
    account = trainer_account_name(name)
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _metadata(body, account),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(body, account),
            "rules": [{
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["patch"],
            }],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(body, account),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": body["metadata"]["namespace"]}],
        },
    ]


# --- the pod template ----------------------------------------------------------------------


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _env(body: dict[str, Any], spec: RewardModelJobSpec, distributed_env: list[dict]) -> list[dict[str, Any]]:
    """Cache locations (unless the user sets them), the user's env, then what the operator owns.

    The spec forbids user variables named like the operator's, so no name appears twice.
    """
    user_env = [env.model_dump(by_alias=True, exclude_none=True) for env in spec.resources.env]
    user_names = {env["name"] for env in user_env}
    env = [{"name": key, "value": value} for key, value in CACHE_ENV.items() if key not in user_names]
    env += user_env
    if SHUTDOWN_TIMEOUT_ENV not in user_names:
        grace = spec.run_policy.termination_grace_period_seconds
        env.append({"name": SHUTDOWN_TIMEOUT_ENV, "value": str(max(grace - SHUTDOWN_MARGIN_SECONDS, 1))})
    env += [
        {"name": "RMJOB_JOB_NAME", "value": body["metadata"]["name"]},
        {"name": "RMJOB_NAMESPACE", "value": body["metadata"]["namespace"]},
    ]
    if spec.hub.token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", spec.hub.token_secret_ref))
    if spec.tracking.wandb is not None:
        env.append(_secret_env("WANDB_API_KEY", spec.tracking.wandb.api_key_secret_ref))
    return env + distributed_env


def _volumes(body: dict[str, Any], spec: RewardModelJobSpec) -> tuple[list[dict], list[dict]]:
    """The operator's volumes (config, /dev/shm, caches, outputs) plus the user's.

    Outputs are ``spec.storage``'s claim, else an emptyDir. The cache and output emptyDirs are
    left out when the user mounts something at their path.
    """
    name = body["metadata"]["name"]
    user_volumes = [v.model_dump(by_alias=True, exclude_none=True) for v in spec.resources.volumes]
    user_mounts = [m.model_dump(by_alias=True, exclude_none=True) for m in spec.resources.volume_mounts]
    user_paths = {m["mountPath"].rstrip("/") for m in user_mounts}
    config, shm = f"{OPERATOR_VOLUME_PREFIX}config", f"{OPERATOR_VOLUME_PREFIX}shm"
    volumes = [
        {"name": config, "configMap": {"name": config_map_name(name)}},
        # NCCL and the data loaders need more shared memory than the container runtime's 64 MiB.
        {"name": shm, "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": config, "mountPath": CONFIG_MOUNT_PATH, "readOnly": True},
        {"name": shm, "mountPath": SHM_MOUNT_PATH},
    ]
    output = f"{OPERATOR_VOLUME_PREFIX}output"
    storage = spec.storage
    if storage is not None:
        claim = storage.existing_claim or output_claim_name(name)
        volumes.append({"name": output, "persistentVolumeClaim": {"claimName": claim}})
        mount = {"name": output, "mountPath": OUTPUT_MOUNT_PATH}
        if storage.sub_path:
            mount["subPath"] = storage.sub_path
        mounts.append(mount)
    for volume, path in ((f"{OPERATOR_VOLUME_PREFIX}cache", CACHE_MOUNT_PATH), (output, OUTPUT_MOUNT_PATH)):
        if path not in user_paths and not any(m["mountPath"] == path for m in mounts):
            volumes.append({"name": volume, "emptyDir": {}})
            mounts.append({"name": volume, "mountPath": path})
    return volumes + user_volumes, mounts + user_mounts


def _container_resources(spec: RewardModelJobSpec) -> dict[str, Any]:
    requested = spec.resources.resources
    limits = dict(requested.limits)
    if spec.resources.gpus_per_node:
        limits["nvidia.com/gpu"] = spec.resources.gpus_per_node
    resources: dict[str, Any] = {}
    if requested.requests:
        resources["requests"] = dict(requested.requests)
    if limits:
        resources["limits"] = limits
    return resources


# With the pod-level settings below, what Pod Security "restricted" asks of every container:
# namespaces that enforce it refuse the pods otherwise.
TRAINER_CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
TRAINER_POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _pod_template(
    body: dict[str, Any],
    spec: RewardModelJobSpec,
    *,
    image: str,
    command: list[str],
    port_name: str,
    distributed_env: list[dict[str, Any]],
    extra_pod_spec: dict[str, Any],
) -> dict[str, Any]:
    name = body["metadata"]["name"]
    res = spec.resources
    volumes, mounts = _volumes(body, spec)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": command,
        "env": _env(body, spec, distributed_env),
        "ports": [{"name": port_name, "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": _container_resources(spec),
        "securityContext": TRAINER_CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": mounts,
    }
    if res.image_pull_policy:
        container["imagePullPolicy"] = res.image_pull_policy
    pod_spec: dict[str, Any] = {
        "serviceAccountName": res.service_account_name or trainer_account_name(name),
        # The trainer image runs as uid 10001; fsGroup makes mounted volumes (the output PVC,
        # dataset and cache volumes) writable by it.
        "securityContext": TRAINER_POD_SECURITY_CONTEXT,
        "containers": [container],
        "volumes": volumes,
        # SIGTERM to SIGKILL: the trainer finishes its step and writes a checkpoint meanwhile.
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        **extra_pod_spec,
    }
    optional = {
        "imagePullSecrets": [s.model_dump(by_alias=True) for s in res.image_pull_secrets],
        "nodeSelector": dict(res.node_selector),
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations],
        "affinity": res.affinity,
        "priorityClassName": res.priority_class_name,
    }
    pod_spec.update({key: value for key, value in optional.items() if value})
    return {"metadata": {"labels": labels(name)}, "spec": pod_spec}


def _image(spec: RewardModelJobSpec, default_image: str | None) -> str:
    return spec.resources.image or default_image or DEFAULT_IMAGE


def _workload_metadata(body: dict[str, Any], spec: RewardModelJobSpec) -> dict[str, Any]:
    queue = {QUEUE_LABEL: spec.run_policy.queue_name} if spec.run_policy.queue_name else {}
    return _metadata(body, body["metadata"]["name"], queue)


def _nproc_per_node(spec: RewardModelJobSpec) -> int:
    return spec.resources.gpus_per_node or 1  # gpusPerNode 0: one CPU process per pod


# --- backend "pytorchjob" ---------------------------------------------------------------------


def _pytorchjob(body: dict[str, Any], spec: RewardModelJobSpec, image: str) -> dict[str, Any]:
    # Kubeflow sets PET_NNODES, PET_NPROC_PER_NODE and PET_NODE_RANK (read by torchrun) but the
    # master's address only as MASTER_ADDR/MASTER_PORT, which torchrun ignores; Kubernetes
    # expands $(VAR) in the command from the container's env.
    command = [LAUNCHER, "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)", *TRAIN_COMMAND]
    # Kubeflow reads the master's port from the container port of this name.
    template = _pod_template(body, spec, image=image, command=command, port_name="pytorchjob-port",
                             distributed_env=[], extra_pod_spec={})
    # ExitCode: errors of the trainer (exit 1-127) fail the job at once; a preempted trainer
    # (EXIT_PREEMPTED, checkpoint written), signals and infrastructure failures (128+: OOM
    # kill) restart pods, resuming from the newest checkpoint. Without limit: Kubeflow's
    # PastBackoffLimit counts only OnFailure/Always replicas, so backoffLimit does not apply.
    replica = {"restartPolicy": "ExitCode", "template": template}
    replicas = {"Master": {"replicas": 1, **replica}}
    if spec.resources.nodes > 1:
        replicas["Worker"] = {"replicas": spec.resources.nodes - 1, **copy.deepcopy(replica)}
    policy = spec.run_policy
    run_policy: dict[str, Any] = {
        "backoffLimit": policy.backoff_limit,
        "suspend": policy.suspend,
        # Stop the other pods as soon as the job is finished: a failed rank leaves the rest
        # blocked in a collective. Finished pods stay for their logs.
        "cleanPodPolicy": "Running",
    }
    if policy.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _workload_metadata(body, spec),
        "spec": {
            "nprocPerNode": str(_nproc_per_node(spec)),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


# --- backend "job": headless Service + Indexed Job ----------------------------------------------


def _headless_service(body: dict[str, Any]) -> dict[str, Any]:
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(body, name),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must be resolvable before it is Ready: the rendezvous happens at startup.
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: name},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


def _indexed_job(body: dict[str, Any], spec: RewardModelJobSpec, image: str) -> dict[str, Any]:
    name = body["metadata"]["name"]
    nodes = spec.resources.nodes
    distributed_env = [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(_nproc_per_node(spec))},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_PATH}}},
        # Indexed Job pods are named NAME-INDEX; with subdomain=NAME the headless Service
        # gives pod 0 the DNS name NAME-0.NAME.
        {"name": "PET_MASTER_ADDR", "value": f"{name}-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    template = _pod_template(
        body,
        spec,
        image=image,
        command=[LAUNCHER, *TRAIN_COMMAND],
        port_name="rendezvous",
        distributed_env=distributed_env,
        extra_pod_spec={"subdomain": name, "restartPolicy": "Never"},
    )
    policy = spec.run_policy
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": policy.backoff_limit,
        # Gang semantics. torchrun's static rendezvous cannot take a replaced node back into a
        # running group, so retrying one index (what a Job does by default) only leaves the
        # others blocked until NCCL's timeout. So: a pod disrupted by the cluster (preemption,
        # eviction, node drain) or stopped for a preemption (EXIT_PREEMPTED: every rank stops
        # together, checkpoint written) is replaced without using up backoffLimit, and resumes;
        # a pod killed by a signal (OOM kill) counts against backoffLimit. On one node a trainer
        # error (1-127) fails the whole Job at once: retrying cannot help. On several it only
        # counts: when a node is lost, the ranks of the others fail their next collective and
        # exit 1 too, which is no trainer error.
        "podFailurePolicy": {"rules": _pod_failure_rules(nodes)},
        "suspend": policy.suspend,
        "template": template,
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _workload_metadata(body, spec), "spec": job_spec}


def _pod_failure_rules(nodes: int) -> list[dict]:
    rules = [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Ignore", "onExitCodes": {
            "containerName": CONTAINER_NAME, "operator": "In", "values": [EXIT_PREEMPTED]}},
    ]
    if nodes == 1:
        rules.append({"action": "FailJob", "onExitCodes": {
            "containerName": CONTAINER_NAME, "operator": "In", "values": TRAINER_ERROR_EXIT_CODES}})
    return rules


# --- entry points ---------------------------------------------------------------------------------


_WORKLOAD_KINDS = {"pytorchjob": ("kubeflow.org/v1", "PyTorchJob"), "job": ("batch/v1", "Job")}


def workload_ref(body: dict[str, Any], backend: Backend) -> dict[str, str]:
    """``{"apiVersion", "kind", "name"}`` of the workload that :func:`render_children` renders."""
    api_version, kind = _WORKLOAD_KINDS[backend]
    return {"apiVersion": api_version, "kind": kind, "name": body["metadata"]["name"]}


def render_children(
    body: dict[str, Any], backend: Backend, default_image: str | None = None
) -> list[dict[str, Any]]:
    """All children of the RewardModelJob ``body``, in creation order, without ownerReferences.

    ``backend`` is ``"pytorchjob"`` or ``"job"`` (the handler resolves ``auto``). Raises
    :class:`~rmjob_operator.spec.InvalidSpec` for a spec or name the operator cannot run.
    """
    if backend not in _WORKLOAD_KINDS:
        raise ValueError(f"backend must be one of {', '.join(_WORKLOAD_KINDS)}, got {backend!r}")
    if body.get("apiVersion", API_VERSION) != API_VERSION:
        raise ValueError(f"expected a {API_VERSION} object, got {body.get('apiVersion')}")
    check_name(body["metadata"]["name"])
    spec = parse_spec(body["spec"])
    image = _image(spec, default_image)
    claim = [_output_claim(body, spec)] if spec.storage is not None and spec.storage.size is not None else []
    children = [*claim, _config_map(body, spec), *_rbac(body)]
    if backend == "pytorchjob":
        children.append(_pytorchjob(body, spec, image))
    else:
        children += [_headless_service(body), _indexed_job(body, spec, image)]
    return children
