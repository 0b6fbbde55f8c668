"""The RewardModelJob spec: one pydantic model, the single source of truth.

Everything about ``spec`` lives here: field names (camelCase, as in the API), types, enums,
bounds, defaults, descriptions, and the cross-field rules. :mod:`rmjob_operator.crd` turns
these models into the CRD's OpenAPI schema; :func:`parse_spec` validates a job's spec in the
operator with the same rules, so the API server and the operator cannot disagree.

The ``trainer`` section is generated from :class:`rmjob_trainer.config.RewardConfig`, not
retyped: a new trainer flag shows up in the CRD on the next ``make crd``. The fields the
operator owns (the DeepSpeed file, Hub and W&B settings and their secrets) come from their
own sections instead; :meth:`RewardModelJobSpec.trainer_config` combines everything into the
snake_case ``trainer.yaml`` the trainer reads.

Cross-field rules are declared once as :class:`Rule` objects: a Python check (run by
pydantic) and the equivalent CEL expression (emitted as ``x-kubernetes-validations``). Every
CEL rule guards each field it reads with ``has()`` and reads an absent field as its default:
the API server applies defaults before it validates a job, but when the CRD itself is
created it evaluates each node's rules on that node's raw ``default`` (``{}`` for a
section), and reading an absent field there is an error that refuses the whole CRD.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic.alias_generators import to_camel

from rmjob_trainer.chat_templates import CHAT_TEMPLATE_NAMES
from rmjob_trainer.config import CONFIG_FIELDS, RewardConfig

# Where the rendered pods find their files (see render.py).
CONFIG_MOUNT_PATH = "/etc/rmjob"
TRAINER_CONFIG_FILE = "trainer.yaml"
DEEPSPEED_CONFIG_FILE = "deepspeed.json"
OUTPUT_MOUNT_PATH = "/output"
SHM_MOUNT_PATH = "/dev/shm"
# The operator's own volumes are named with this prefix; user volumes may not be.
OPERATOR_VOLUME_PREFIX = "rmjob-"
# Bounds for CEL's cost estimator on the pass-through lists the rules compare pairwise: without
# them it assumes lists and strings as long as a whole request and the API server refuses the CRD.
MAX_VOLUMES = 64
# Volume names are DNS-1123 labels in the pod spec anyway.
MAX_VOLUME_NAME_LENGTH = 63
MAX_MOUNT_PATH_LENGTH = 1024

# Children and pod host names are derived from the job name ("NAME-trainer", "NAME-0.NAME",
# "NAME-worker-12"), and the Job backend's headless Service needs a DNS-1035 label.
MAX_NAME_LENGTH = 48
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class InvalidSpec(ValueError):
    """A RewardModelJob spec the operator cannot run.

    ``field`` is a dotted camelCase path (``spec.trainer.learningRate``); ``errors`` lists
    every ``(field, message)`` found, the first of which is ``(field, message)``.
    """

    def __init__(self, field: str, message: str, errors: list[tuple[str, str]] | None = None):
        self.field = field
        self.message = message
        self.errors = errors or [(field, message)]
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"{field}: {message}{more}")


class _FieldError(ValueError):
    """Raised by a model-level rule; carries the field (relative to the model) to blame."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, in both languages.

    ``field`` is the camelCase path, relative to the model, that an error points at;
    ``check`` receives the validated model and returns whether the rule holds.
    """

    field: str
    message: str
    cel: str
    check: Callable[[Any], bool]

    def to_validation(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field:
            validation["fieldPath"] = "." + self.field
        return validation


def _add_rules_to_schema(schema: dict[str, Any], model: type[_Model]) -> None:
    if model.rules:
        schema["x-kubernetes-validations"] = [rule.to_validation() for rule in model.rules]


class _Model(BaseModel):
    """Base of every spec section: camelCase keys only, unknown keys rejected, strict types.

    Strict mode matches the API server: ``"3"`` is not an integer and ``"yes"`` is not a
    boolean. Unknown keys are an error, as with kubectl's default ``--validate=strict``;
    this is also what makes a plain-text ``token:`` next to ``tokenSecretRef`` impossible.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra=_add_rules_to_schema,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in self.rules:
            if not rule.check(self):
                raise _FieldError(rule.field, rule.message)
        return self


class _OpenModel(_Model):
    """A Kubernetes object passed through to the pod spec: a few fields checked, the rest kept.

    Rendered as ``x-kubernetes-preserve-unknown-fields`` in the CRD; the API server validates
    the contents when the pod template is created.
    """

    model_config = ConfigDict(extra="allow")


# A section left out is defaulted to {} by the API server, which then fills in its fields'
# defaults: `kubectl get` shows the effective settings and CEL rules can rely on them.
_SECTION_DEFAULT = {"default": {}}


# --- small Kubernetes types ------------------------------------------------------------

_QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


# A claim's size: the API server refuses a claim of zero or less ("must be greater than zero"),
# but only when the operator creates it, after the job was accepted. A mantissa with a nonzero
# digit and no minus sign; ``minimum`` bounds the integer form (JSON Schema applies each
# keyword to its own type only).
_POSITIVE_QUANTITY_PATTERN = (
    r"^\+?(([0-9]*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _quantity_type(pattern: str, expected: str, minimum: int | None = None) -> Any:
    """Kubernetes' int-or-string quantity: an int (at least ``minimum``) or a string matching
    ``pattern``; anything else is refused as not ``expected``."""

    def validate(value: Any) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum):
            return value
        if isinstance(value, str) and re.fullmatch(pattern, value):  # `$` alone passes a final "\n"
            return value
        raise ValueError(f"expected {expected}, got {value!r}")

    bounds = {} if minimum is None else {"minimum": minimum}
    return Annotated[
        int | str,
        PlainValidator(validate),
        WithJsonSchema({
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            **bounds,
            "pattern": pattern,
            "x-kubernetes-int-or-string": True,
        }),
    ]


Quantity = _quantity_type(_QUANTITY_PATTERN, "a quantity like 8, '16Gi' or '500m'")
PositiveQuantity = _quantity_type(_POSITIVE_QUANTITY_PATTERN, "a quantity greater than zero like '50Gi'", minimum=1)
# Names of objects the pods refer to (claims, storage classes): the API server refuses any other
# name in the claim the operator creates, and a pod's claim of such a name never binds.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_DNS_SUBDOMAIN_LENGTH = 253
OpenObject = Annotated[dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})]


class SecretKeyRef(_Model):
    """A key of a Secret in the job's namespace. Secrets are only ever referenced."""

    name: str = Field(min_length=1, description="Name of the Secret, in the job's namespace.")
    key: str = Field(min_length=1, description="Key inside the Secret.")


class LocalObjectReference(_Model):
    name: str = Field(min_length=1, description="Name of the object, in the job's namespace.")


class EnvVar(_Model):
    name: str = Field(min_length=1, description="Environment variable name.")
    value: Optional[str] = Field(default=None, description="Literal value.")
    value_from: Optional[OpenObject] = Field(
        default=None, description="Source of the value (secretKeyRef, configMapKeyRef, fieldRef, ...)."
    )

    rules = (
        Rule(
            "valueFrom",
            "set value or valueFrom, not both",
            "!has(self.value) || !has(self.valueFrom)",
            lambda e: e.value is None or e.value_from is None,
        ),
    )


class Volume(_OpenModel):
    name: str = Field(min_length=1, max_length=MAX_VOLUME_NAME_LENGTH,
                      description="Volume name, referenced by volumeMounts.")


class VolumeMount(_OpenModel):
    name: str = Field(min_length=1, max_length=MAX_VOLUME_NAME_LENGTH, description="Name of a volume in volumes.")
    mount_path: str = Field(min_length=1, max_length=MAX_MOUNT_PATH_LENGTH,
                            description="Path inside the trainer container.")


class Toleration(_OpenModel):
    pass


class ResourceRequirements(_Model):
    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="Resources requested per node (cpu, memory, ...)."
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Resource limits per node. nvidia.com/gpu is set from gpusPerNode.",
    )


# --- spec.trainer: generated from RewardConfig ------------------------------------------

# RewardConfig fields the operator sets from other sections, and where.
OPERATOR_OWNED = {
    "deepspeed": "deepspeed",
    "with_tracking": "tracking.wandb",
    "wandb_project_name": "tracking.wandb.project",
    "wandb_entity": "tracking.wandb.entity",
    "push_to_hub": "hub.push",
    "hf_entity": "hub.entity",
    "hf_repo_id": "hub.repoId",
    "hf_repo_revision": "hub.revision",
    "hf_repo_private": "hub.private",
}
# Defaults that differ in a cluster: the model goes to the output volume.
TRAINER_DEFAULTS = {"output_dir": OUTPUT_MOUNT_PATH}
# Closed sets the dataclass types as plain strings.
TRAINER_CHOICES: dict[str, tuple[str, ...]] = {"chat_template": CHAT_TEMPLATE_NAMES}
# Bounds for CEL's cost estimator, which otherwise assumes lists as long as a request.
MAX_DATASETS = 64


def _camel_flags(text: str) -> str:
    """Help strings name CLI flags (``--dataset_mixer``); the CRD says ``datasetMixer``."""
    def camel(match: re.Match) -> str:
        return to_camel(match.group(1)) if match.group(1) in CONFIG_FIELDS else match.group(0)

    return re.sub(r"--([a-z0-9_]+)", camel, text)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(tp) and len(args) == 1 else tp


def _trainer_field(f: dataclasses.Field, tp: Any) -> tuple[Any, Any]:
    """One RewardConfig field -> (annotation, FieldInfo) for the trainer model."""
    meta = f.metadata
    required = meta.get("required", False)
    constraints: dict[str, Any] = {"description": _camel_flags(meta["help"])}
    if "minimum" in meta:
        constraints["ge"] = meta["minimum"]
    if "exclusiveMinimum" in meta:
        constraints["gt"] = meta["exclusiveMinimum"]
    if f.name in TRAINER_CHOICES:
        choice = Literal[TRAINER_CHOICES[f.name]]
        tp = Optional[choice] if _strip_optional(tp) is not tp else choice
    inner = _strip_optional(tp)
    if typing.get_origin(inner) is dict:
        constraints.update(min_length=1, max_length=MAX_DATASETS)
    if typing.get_origin(inner) is list:
        constraints.update(min_length=1, max_length=MAX_DATASETS)
    if required:
        return inner, Field(**constraints)
    if f.name in TRAINER_DEFAULTS:
        return tp, Field(default=TRAINER_DEFAULTS[f.name], **constraints)
    if f.default_factory is not dataclasses.MISSING:
        # pydantic leaves factory defaults out of the schema; the API server should apply them.
        extra = {"default": f.default_factory()}
        return tp, Field(default_factory=f.default_factory, json_schema_extra=extra, **constraints)
    return tp, Field(default=f.default, **constraints)


def _unique(values: list[str]) -> bool:
    return len(values) == len(set(values))


def _is_mixer(mixer: dict[str, float] | None) -> bool:
    return mixer is None or all(0 < v <= 1 or (v > 1 and float(v).is_integer()) for v in mixer.values())


def _mixer_cel(field: str) -> str:
    value = f"self.{field}[k]"
    return (f"!has(self.{field}) || self.{field}.all(k, ({value} > 0.0 && {value} <= 1.0) || "
            f"({value} > 1.0 && double(int({value})) == {value}))")


def _splits_ok(splits: list[str], mixer: dict[str, float]) -> bool:
    return len(splits) in (1, len(mixer))


class _TrainerBase(_Model):
    """``spec.trainer``: every RewardConfig field (camelCase) the operator does not own."""

    rules = (
        Rule(
            "datasetMixer",
            "values must be fractions in (0, 1] or whole numbers of rows > 1",
            _mixer_cel("datasetMixer"),
            lambda t: _is_mixer(t.dataset_mixer),
        ),
        Rule(
            "datasetEvalMixer",
            "values must be fractions in (0, 1] or whole numbers of rows > 1",
            _mixer_cel("datasetEvalMixer"),
            lambda t: _is_mixer(t.dataset_eval_mixer),
        ),
        Rule(
            "datasetTrainSplits",
            "give one split, or one per dataset of datasetMixer",
            "!has(self.datasetTrainSplits) || size(self.datasetTrainSplits) == 1 || "
            "(has(self.datasetMixer) && size(self.datasetTrainSplits) == size(self.datasetMixer))",
            lambda t: _splits_ok(t.dataset_train_splits, t.dataset_mixer),
        ),
        Rule(
            "datasetEvalSplits",
            "give one split, or one per dataset of datasetEvalMixer (or datasetMixer)",
            "!has(self.datasetEvalSplits) || size(self.datasetEvalSplits) == 1 || "
            "(has(self.datasetEvalMixer) ? size(self.datasetEvalSplits) == size(self.datasetEvalMixer) : "
            "has(self.datasetMixer) && size(self.datasetEvalSplits) == size(self.datasetMixer))",
            lambda t: _splits_ok(t.dataset_eval_splits, t.dataset_eval_mixer or t.dataset_mixer),
        ),
    )


_HINTS = typing.get_type_hints(RewardConfig)
TrainerSpec: type[_Model] = create_model(
    "TrainerSpec",
    __base__=_TrainerBase,
    __module__=__name__,
    **{
        f.name: _trainer_field(f, _HINTS[f.name])
        for f in dataclasses.fields(RewardConfig)
        if f.name not in OPERATOR_OWNED
    },
)


# --- the other sections ----------------------------------------------------------------


class ResourcesSpec(_Model):
    """``spec.resources``: topology, image and everything else that goes into the pods."""

    nodes: int = Field(default=1, ge=1, description="Pods (machines) to train on.")
    gpus_per_node: int = Field(
        default=1,
        ge=0,
        description="GPUs per pod; one training process per GPU. 0 runs one CPU process per pod "
        "(smoke tests, clusters without GPUs).",
    )
    image: Optional[str] = Field(
        default=None, min_length=1, description="Trainer image (default: the operator's RMJOB_TRAINER_IMAGE)."
    )
    image_pull_policy: Optional[Literal["Always", "IfNotPresent", "Never"]] = Field(
        default=None, description="Image pull policy of the trainer container."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, description="Secrets for pulling the trainer image."
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, json_schema_extra=_SECTION_DEFAULT,
        description="CPU/memory requests and limits of each pod.",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    affinity: Optional[OpenObject] = Field(default=None, description="Pod affinity (a Kubernetes Affinity).")
    priority_class_name: Optional[str] = Field(default=None, description="PriorityClass of the pods.")
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=256,
        description="Extra environment variables of the trainer container.",
    )
    volumes: list[Volume] = Field(
        default_factory=list, max_length=MAX_VOLUMES, description="Extra pod volumes (e.g. a PVC for outputs)."
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=MAX_VOLUMES,
        description=f"Mounts of those volumes. Mount a persistent volume at {OUTPUT_MOUNT_PATH} to keep "
        "the model and checkpoints (default: an emptyDir).",
    )
    service_account_name: Optional[str] = Field(
        default=None,
        description="Service account of the pods (default: the job's own NAME-trainer account, "
        "allowed to patch this job's status).",
    )

    rules = (
        Rule(
            "env",
            "HF_TOKEN, WANDB_API_KEY, PET_* and RMJOB_* are set by the operator; give the secrets "
            "as hub.tokenSecretRef and tracking.wandb.apiKeySecretRef",
            "!has(self.env) || self.env.all(e, !(e.name in ['HF_TOKEN', 'WANDB_API_KEY']) && "
            "!e.name.startsWith('PET_') && !e.name.startsWith('RMJOB_'))",
            lambda r: all(
                e.name not in ("HF_TOKEN", "WANDB_API_KEY") and not e.name.startswith(("PET_", "RMJOB_"))
                for e in r.env
            ),
        ),
        # What the API server would refuse in the pod template, where a 422 comes too late.
        Rule(
            "volumes",
            f"volume names must be unique and not start with '{OPERATOR_VOLUME_PREFIX}' (the operator's volumes)",
            f"!has(self.volumes) || self.volumes.all(v, !v.name.startsWith('{OPERATOR_VOLUME_PREFIX}') && "
            "self.volumes.exists_one(w, w.name == v.name))",
            lambda r: _unique([v.name for v in r.volumes])
            and not any(v.name.startswith(OPERATOR_VOLUME_PREFIX) for v in r.volumes),
        ),
        Rule(
            "volumeMounts",
            f"each mountPath may be used once, and not at {CONFIG_MOUNT_PATH} or {SHM_MOUNT_PATH} "
            "(the operator's mounts)",
            "!has(self.volumeMounts) || self.volumeMounts.all(m, "
            f"!(m.mountPath in ['{CONFIG_MOUNT_PATH}', '{SHM_MOUNT_PATH}']) && "
            "self.volumeMounts.exists_one(n, n.mountPath == m.mountPath))",
            lambda r: _unique([m.mount_path for m in r.volume_mounts])
            and not any(m.mount_path in (CONFIG_MOUNT_PATH, SHM_MOUNT_PATH) for m in r.volume_mounts),
        ),
        Rule(
            "volumeMounts",
            "each volumeMount must name a volume of volumes",
            "!has(self.volumeMounts) || self.volumeMounts.all(m, "
            "has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
            lambda r: {m.name for m in r.volume_mounts} <= {v.name for v in r.volumes},
        ),
    )


class DeepSpeedSpec(_Model):
    """``spec.deepspeed``: ZeRO settings; stage 0 trains with plain DDP."""

    stage: Literal[0, 2, 3] = Field(default=0, description="ZeRO stage: 0 (no DeepSpeed, DDP), 2 or 3.")
    offload_optimizer: bool = Field(
        default=False, description="Keep optimizer states in CPU memory (stage 2 or 3)."
    )
    offload_params: bool = Field(default=False, description="Keep parameters in CPU memory (stage 3).")
    bf16: bool = Field(
        default=True,
        description="bf16 training in DeepSpeed; must agree with trainer.mixedPrecision "
        "(true: auto or bf16, false: no or fp16).",
    )
    config: Optional[OpenObject] = Field(
        default=None,
        description="Raw DeepSpeed JSON merged over the generated one (stage 2 or 3). Batch sizes "
        "always come from the trainer section.",
    )

    rules = (
        Rule(
            "offloadParams",
            "offloadParams needs stage 3",
            "!has(self.offloadParams) || !self.offloadParams || (has(self.stage) && self.stage == 3)",
            lambda d: not d.offload_params or d.stage == 3,
        ),
        Rule(
            "offloadOptimizer",
            "offloadOptimizer needs stage 2 or 3",
            "!has(self.offloadOptimizer) || !self.offloadOptimizer || (has(self.stage) && self.stage != 0)",
            lambda d: not d.offload_optimizer or d.stage != 0,
        ),
        Rule(
            "config",
            "a raw config needs stage 2 or 3 (stage 0 does not use DeepSpeed)",
            "!has(self.config) || (has(self.stage) && self.stage != 0)",
            lambda d: d.config is None or d.stage != 0,
        ),
    )


def _owned_help(name: str) -> str:
    return _camel_flags(CONFIG_FIELDS[name].metadata["help"])


class HubSpec(_Model):
    """``spec.hub``: pushing the trained model to the Hugging Face Hub."""

    push: bool = Field(default=CONFIG_FIELDS["push_to_hub"].default, description=_owned_help("push_to_hub"))
    repo_id: Optional[str] = Field(default=None, description=_owned_help("hf_repo_id"))
    entity: Optional[str] = Field(default=None, description=_owned_help("hf_entity"))
    revision: Optional[str] = Field(default=None, description=_owned_help("hf_repo_revision"))
    private: bool = Field(
        default=CONFIG_FIELDS["hf_repo_private"].default, description=_owned_help("hf_repo_private")
    )
    token_secret_ref: Optional[SecretKeyRef] = Field(
        default=None,
        description="Secret key holding the Hub token, exposed to the trainer as HF_TOKEN "
        "(also used to download gated base models).",
    )

    rules = (
        Rule(
            "tokenSecretRef",
            "push needs tokenSecretRef",
            "!has(self.push) || !self.push || has(self.tokenSecretRef)",
            lambda h: not h.push or h.token_secret_ref is not None,
        ),
    )


class WandbSpec(_Model):
    project: str = Field(
        default=CONFIG_FIELDS["wandb_project_name"].default,
        min_length=1,
        description=_owned_help("wandb_project_name"),
    )
    entity: Optional[str] = Field(default=None, description=_owned_help("wandb_entity"))
    api_key_secret_ref: SecretKeyRef = Field(description="Secret key holding the W&B API key (WANDB_API_KEY).")


class TrackingSpec(_Model):
    """``spec.tracking``: experiment tracking; present ``wandb`` turns Weights & Biases on."""

    wandb: Optional[WandbSpec] = Field(default=None, description=_owned_help("with_tracking"))


# With persistent storage a restarted pod can continue, so checkpoints are on unless the trainer
# section sets its own interval. In steps, the trainer's only interval: about every 5-10 minutes
# for a multi-billion-parameter model on one node, seconds for a small one.
STORAGE_CHECKPOINTING_STEPS = 100
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany")
RWX = "ReadWriteMany"


class StorageSpec(_Model):
    """``spec.storage``: a PersistentVolumeClaim mounted at the output directory of every pod."""

    existing_claim: Optional[str] = Field(
        default=None, min_length=1, max_length=MAX_DNS_SUBDOMAIN_LENGTH, pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of a PersistentVolumeClaim in the job's namespace to mount (the operator "
        "neither creates nor deletes it). With nodes > 1 it must be ReadWriteMany.",
    )
    sub_path: Optional[str] = Field(
        default=None, min_length=1, max_length=MAX_MOUNT_PATH_LENGTH, pattern=r"^[^/]",
        description="Directory inside existingClaim to use (default: the claim's root); lets jobs share "
        "one claim without replacing each other's checkpoints.",
    )
    size: Optional[PositiveQuantity] = Field(
        default=None,
        description="Size of the claim the operator creates for this job, NAME-output (e.g. 50Gi). "
        "Set this or existingClaim.",
    )
    storage_class_name: Optional[str] = Field(
        default=None, min_length=1, max_length=MAX_DNS_SUBDOMAIN_LENGTH, pattern=DNS_SUBDOMAIN_PATTERN,
        description="StorageClass of the created claim (default: the cluster's default)."
    )
    access_modes: Optional[list[Literal[ACCESS_MODES]]] = Field(  # type: ignore[valid-type]
        default=None, min_length=1, max_length=len(ACCESS_MODES),
        description="Access modes of the created claim (default: ReadWriteOnce for one node, "
        "ReadWriteMany for several: every node writes its checkpoint shards and reads them all back).",
    )
    retain_on_delete: bool = Field(
        default=False,
        description="Keep the created claim when the job is deleted (it is owned by the job otherwise). "
        "A job created again under the same name mounts it and continues.",
    )

    rules = (
        Rule(
            "",
            "set exactly one of existingClaim (a claim of yours) and size (a claim the operator creates)",
            "has(self.existingClaim) != has(self.size)",
            lambda s: (s.existing_claim is None) != (s.size is None),
        ),
        Rule(
            "existingClaim",
            "storageClassName, accessModes and retainOnDelete describe a created claim; with "
            "existingClaim the claim is yours",
            "!has(self.existingClaim) || (!has(self.storageClassName) && !has(self.accessModes) && "
            "(!has(self.retainOnDelete) || !self.retainOnDelete))",
            lambda s: s.existing_claim is None
            or (s.storage_class_name is None and s.access_modes is None and not s.retain_on_delete),
        ),
        Rule(
            "subPath",
            "subPath needs existingClaim (a created claim belongs to this job alone)",
            "!has(self.subPath) || has(self.existingClaim)",
            lambda s: s.sub_path is None or s.existing_claim is not None,
        ),
        # The API server refuses a pod whose subPath climbs out of its volume, too late for the CRD.
        Rule(
            "subPath",
            "subPath must not contain '..'",
            "!has(self.subPath) || !self.subPath.contains('..')",
            lambda s: s.sub_path is None or ".." not in s.sub_path,
        ),
    )


class RunPolicySpec(_Model):
    """``spec.runPolicy``: how the workload is run, retried and cleaned up."""

    backend: Literal["auto", "pytorchjob", "job"] = Field(
        default="auto",
        description="Workload kind: a Kubeflow PyTorchJob, an Indexed Job with a headless Service, "
        "or auto (PyTorchJob when its CRD is installed).",
    )
    backoff_limit: int = Field(
        default=0, ge=0,
        description="Retries before the job is marked failed (Indexed Job: pods killed by a signal; preempted "
        "and disrupted pods do not count). Kubeflow ignores it for the PyTorchJob's ExitCode replicas: there a "
        "pod killed by a signal is restarted without limit.",
    )
    active_deadline_seconds: Optional[int] = Field(
        default=None, ge=1, description="Wall-clock limit of the whole run, in seconds."
    )
    ttl_seconds_after_finished: Optional[int] = Field(
        default=None, ge=0, description="Delete the workload's pods this long after it finishes."
    )
    suspend: bool = Field(default=False, description="Create the workload suspended, or suspend a running one.")
    queue_name: Optional[str] = Field(
        default=None, min_length=1, description="Kueue LocalQueue to admit the workload through."
    )
    termination_grace_period_seconds: int = Field(
        default=300, ge=0,
        description="Seconds a trainer pod has between SIGTERM (preemption, eviction, node drain) and "
        "SIGKILL: long enough to finish the step and write a checkpoint.",
    )


# An absent deepspeed section or stage is stage 0.
_NO_DEEPSPEED_CEL = "!has(self.deepspeed) || !has(self.deepspeed.stage) || self.deepspeed.stage == 0"


class RewardModelJobSpec(_Model):
    """The ``spec`` of a RewardModelJob."""

    trainer: TrainerSpec = Field(  # type: ignore[valid-type]
        description="Trainer settings: the rmjob-train flags, camelCase (Hub, W&B and DeepSpeed "
        "settings have their own sections).",
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        json_schema_extra=_SECTION_DEFAULT,
        description="Pods: topology, image, scheduling.",
    )
    deepspeed: DeepSpeedSpec = Field(
        default_factory=DeepSpeedSpec, json_schema_extra=_SECTION_DEFAULT, description="DeepSpeed ZeRO."
    )
    hub: HubSpec = Field(
        default_factory=HubSpec, json_schema_extra=_SECTION_DEFAULT, description="Hugging Face Hub upload."
    )
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, json_schema_extra=_SECTION_DEFAULT, description="Experiment tracking."
    )
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec,
        json_schema_extra=_SECTION_DEFAULT,
        description="Run, retry and cleanup policy.",
    )
    storage: Optional[StorageSpec] = Field(
        default=None,
        description=f"Persistent outputs: a PersistentVolumeClaim at {OUTPUT_MOUNT_PATH} instead of an emptyDir, "
        f"so the model and checkpoints outlive the pods; checkpoints then default to every "
        f"{STORAGE_CHECKPOINTING_STEPS} steps and a restarted pod resumes from the newest one.",
    )

    rules = (
        Rule(
            "deepspeed.stage",
            "DeepSpeed (stage 2 or 3) needs gpusPerNode >= 1",
            f"{_NO_DEEPSPEED_CEL} || !has(self.resources) || !has(self.resources.gpusPerNode) || "
            "self.resources.gpusPerNode >= 1",
            lambda s: s.deepspeed.stage == 0 or s.resources.gpus_per_node >= 1,
        ),
        Rule(
            "trainer.mixedPrecision",
            "with DeepSpeed, mixedPrecision must agree with deepspeed.bf16 "
            "(bf16 true: auto or bf16; false: no or fp16)",
            f"{_NO_DEEPSPEED_CEL} || !has(self.trainer) || "
            "(has(self.deepspeed.bf16) && !self.deepspeed.bf16 ? "
            "has(self.trainer.mixedPrecision) && self.trainer.mixedPrecision in ['no', 'fp16'] : "
            "!has(self.trainer.mixedPrecision) || self.trainer.mixedPrecision in ['auto', 'bf16'])",
            lambda s: s.deepspeed.stage == 0
            or s.trainer.mixed_precision in (("auto", "bf16") if s.deepspeed.bf16 else ("no", "fp16")),
        ),
        # Every node writes its checkpoint shards to the claim and, on a restart, may land on
        # another machine and read them all back: only a claim all nodes mount at once works.
        Rule(
            "storage.accessModes",
            f"with nodes > 1 the claim must be {RWX} (every node writes and reads checkpoints)",
            "!has(self.storage) || !has(self.storage.accessModes) || !has(self.resources) || "
            f"!has(self.resources.nodes) || self.resources.nodes == 1 || '{RWX}' in self.storage.accessModes",
            lambda s: s.storage is None or s.storage.access_modes is None or s.resources.nodes == 1
            or RWX in s.storage.access_modes,
        ),
        Rule(
            "trainer.outputDir",
            f"with storage, outputDir must be {OUTPUT_MOUNT_PATH} or below it (where the claim is mounted)",
            f"!has(self.storage) || !has(self.trainer) || !has(self.trainer.outputDir) || "
            f"self.trainer.outputDir == '{OUTPUT_MOUNT_PATH}' || self.trainer.outputDir.startsWith('{OUTPUT_MOUNT_PATH}/')",
            lambda s: s.storage is None or s.trainer.output_dir == OUTPUT_MOUNT_PATH
            or s.trainer.output_dir.startswith(OUTPUT_MOUNT_PATH + "/"),
        ),
        Rule(
            "resources.volumeMounts",
            f"with storage, {OUTPUT_MOUNT_PATH} is the claim's; mount nothing else there",
            "!has(self.storage) || !has(self.resources) || !has(self.resources.volumeMounts) || "
            f"!self.resources.volumeMounts.exists(m, m.mountPath == '{OUTPUT_MOUNT_PATH}' || "
            f"m.mountPath == '{OUTPUT_MOUNT_PATH}/')",
            lambda s: s.storage is None
            or not any(m.mount_path.rstrip("/") == OUTPUT_MOUNT_PATH for m in s.resources.volume_mounts),
        ),
    )

    @property
    def claim_access_modes(self) -> list[str]:
        """The access modes of the claim the operator creates."""
        if self.storage and self.storage.access_modes:
            return list(self.storage.access_modes)
        return ["ReadWriteOnce" if self.resources.nodes == 1 else RWX]

    @property
    def world_size(self) -> int:
        return self.resources.nodes * max(self.resources.gpus_per_node, 1)

    def trainer_config(self) -> dict[str, Any]:
        """The trainer.yaml contents: RewardConfig keys (snake_case), explicit values only."""
        config = self.trainer.model_dump(exclude_none=True)
        hub = self.hub
        config.update(push_to_hub=hub.push, hf_repo_private=hub.private)
        optional = {"hf_repo_id": hub.repo_id, "hf_entity": hub.entity, "hf_repo_revision": hub.revision}
        config.update({key: value for key, value in optional.items() if value is not None})
        wandb = self.tracking.wandb
        config["with_tracking"] = wandb is not None
        if wandb is not None:
            config["wandb_project_name"] = wandb.project
            if wandb.entity is not None:
                config["wandb_entity"] = wandb.entity
        if self.deepspeed.stage:
            config["deepspeed"] = f"{CONFIG_MOUNT_PATH}/{DEEPSPEED_CONFIG_FILE}"
        if self.storage is not None:
            config.setdefault("checkpointing_steps", STORAGE_CHECKPOINTING_STEPS)
        return config


# --- status (written by the operator; the schema lives in the CRD) -----------------------

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class _Status(BaseModel):
    """Status models only describe the schema; the operator writes plain dicts."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")


class Condition(_Status):
    type: str = Field(description="Condition type (Created, Running, Succeeded, Failed, Suspended).")
    status: Literal["True", "False", "Unknown"]
    reason: Optional[str] = None
    message: Optional[str] = None
    last_transition_time: Optional[DateTime] = None
    observed_generation: Optional[int] = None


class WorkloadRef(_Status):
    api_version: str
    kind: str
    name: str


class Topology(_Status):
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    world_size: Optional[int] = Field(default=None, description="Training processes in all.")


class Metrics(_Status):
    step: Optional[int] = Field(default=None, description="Optimizer steps done.")
    total_steps: Optional[int] = None
    episode: Optional[int] = Field(default=None, description="Preference pairs consumed.")
    epoch: Optional[float] = None
    train_loss: Optional[float] = None
    train_accuracy: Optional[float] = None
    eval_loss: Optional[float] = None
    eval_accuracy: Optional[float] = None
    eval_reward_margin: Optional[float] = None
    benchmark_accuracy: Optional[float] = Field(default=None, description="Overall accuracy on trainer.evalBenchmark (latest scoring).")


class Progress(_Status):
    """Named after Kubeflow Trainer's trainerStatus (progressPercentage, estimatedRemainingSeconds)."""

    percentage: Optional[int] = Field(default=None, description="Optimizer steps done, in percent of all steps.")
    estimated_remaining_seconds: Optional[int] = Field(
        default=None,
        description="Time left at the rate of steps between the trainer's last two reports (absent "
        "until two reports of one run exist).",
    )


class HubStatus(_Status):
    repo: Optional[str] = None
    revision: Optional[str] = None
    commit: Optional[str] = None
    url: Optional[str] = None


class WandbStatus(_Status):
    url: Optional[str] = None


class RewardModelJobStatus(_Status):
    phase: Optional[Literal[PHASES]] = None  # type: ignore[valid-type]
    message: Optional[str] = Field(default=None, description="Human-readable state, e.g. why the job failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard Kubernetes conditions, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: Optional[int] = None
    start_time: Optional[DateTime] = None
    completion_time: Optional[DateTime] = None
    workload: Optional[WorkloadRef] = Field(
        default=None, description="The PyTorchJob or Job running the training."
    )
    metrics: Optional[Metrics] = Field(default=None, description="Latest training metrics (from status.training).")
    progress: Optional[Progress] = Field(default=None, description="How far the training is, and how long it has left.")
    hub: Optional[HubStatus] = Field(default=None, description="Where the model was pushed.")
    wandb: Optional[WandbStatus] = None
    topology: Optional[Topology] = Field(default=None, description="Nodes and processes of the workload.")
    training: Optional[OpenObject] = Field(default=None, description="Progress reported by the trainer's rank 0.")
    kopf: Optional[OpenObject] = Field(default=None, description="The operator framework's own bookkeeping.")


# --- entry points ----------------------------------------------------------------------


def _path(loc: tuple[Any, ...]) -> str:
    parts = ["spec"]
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif item:
            parts.append(str(item))
    return ".".join(parts)


def _message(error: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        extra = tuple(cause.field.split(".")) if cause.field else ()
        return error["loc"] + extra, str(cause)
    if error["type"] == "extra_forbidden":
        return error["loc"], "unknown field"
    if isinstance(cause, ValueError):
        return error["loc"], str(cause)
    return error["loc"], error["msg"]


def parse_spec(spec: dict[str, Any]) -> RewardModelJobSpec:
    """A RewardModelJob's ``spec`` -> validated model; raises :class:`InvalidSpec`."""
    if not isinstance(spec, dict):
        raise InvalidSpec("spec", "must be an object")
    try:
        return RewardModelJobSpec.model_validate(spec)
    except ValidationError as exc:
        errors = [(_path(loc), message) for loc, message in map(_message, exc.errors())]
        raise InvalidSpec(*errors[0], errors=errors) from None


def check_existing_claim(spec: RewardModelJobSpec, claim: dict[str, Any] | None) -> None:
    """``spec.storage.existingClaim`` as found in the cluster (``claim``, None when absent):
    raises :class:`InvalidSpec` when the nodes cannot share it. The CRD cannot check this, it
    does not see the claim. An absent claim is left to the scheduler, which holds the pods
    until it exists."""
    if claim is None or spec.resources.nodes == 1:
        return
    modes = claim.get("spec", {}).get("accessModes") or []
    if RWX not in modes:
        raise InvalidSpec(
            "spec.storage.existingClaim",
            f"PersistentVolumeClaim {claim['metadata']['name']} is {', '.join(modes) or 'without access modes'}; "
            f"with nodes > 1 it must be {RWX} (every node writes and reads checkpoints)",
        )


def check_name(name: str) -> None:
    """Job names become Service and pod host names; raises :class:`InvalidSpec`."""
    if len(name) > MAX_NAME_LENGTH or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidSpec("metadata.name", NAME_MESSAGE)


NAME_MESSAGE = (
    f"must be at most {MAX_NAME_LENGTH} characters of lowercase letters, digits and '-', "
    "starting with a letter (it names the job's Service and pods)"
)
NAME_RULE_CEL = f"size(self.metadata.name) <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{NAME_PATTERN}')"
