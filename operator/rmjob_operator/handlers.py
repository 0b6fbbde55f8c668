"""kopf handlers for RewardModelJob: read, render, apply idempotently, patch status.

One handler per concern:

- ``reconcile`` (create/resume): validate the spec, create the owned children, record the workload.
- ``workload_changed`` (PyTorchJob/Job events): derive phase + conditions from the workload.
- ``spec_changed`` (spec updates): apply the runPolicy fields a running workload can take,
  refuse everything else with a ``SpecChangeRefused`` condition.
- ``training_reported`` (``status.training``, written by the trainer): copy to metrics/hub/wandb.

The operator writes only the ``status`` of a RewardModelJob (kopf's own bookkeeping included,
see ``configure``), never its spec or metadata, so GitOps tools see no drift. There is no
finalizer: the children carry ownerReferences and Kubernetes' garbage collector deletes them
with the job, even while the operator is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import time
import types
import typing
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

import aiohttp
import kopf
from pydantic import BaseModel

from rmjob_operator import API_VERSION, GROUP, KIND, PLURAL, VERSION, metrics, render
from rmjob_operator import conditions as cond
from rmjob_operator.kube import PLURALS, ApiError, KubeApi, object_path, path_of
from rmjob_operator.spec import InvalidSpec, RewardModelJobSpec, check_existing_claim, check_name, parse_spec

JOB_LABEL = "rmjob.dev/job-name"
# On the workload: what it was rendered from, to judge later spec edits against.
SPEC_SNAPSHOT_ANNOTATION = "rmjob.dev/spec-snapshot"  # every field but the safe runPolicy ones
RUN_POLICY_ANNOTATION = "rmjob.dev/run-policy"  # the safe runPolicy fields last applied
# What operators before the snapshot wrote instead: a hash, which cannot tell which field changed.
LEGACY_SPEC_HASH_ANNOTATION = "rmjob.dev/spec-hash"
PYTORCHJOB_API = ("kubeflow.org/v1", "pytorchjobs")
# The events the API server sends the operator: field selectors only AND exact matches, so the
# two reasons (Job's FailedCreate, Kubeflow's FailedCreatePod) and two kinds cannot be named
# at once; Warnings not about Pods leave out the bulk of a cluster's events (Normal ones, and
# pods' scheduling, probe and back-off warnings). The handler picks the reasons.
EVENTS_FIELD_SELECTOR = "type=Warning,involvedObject.kind!=Pod"
WORKLOAD_RESOURCES = (("batch", "jobs"), ("kubeflow.org", "pytorchjobs"))  # (group, plural)

# Between retries of a child whose name a deleted job's child still holds.
STALE_CHILD_RETRY_SECONDS = 5.0
# Status writes answered 409 Conflict: read the job again and retry, this many times in all.
STATUS_CONFLICT_ATTEMPTS = 5
# Answers of an API server that is overloaded or restarting (and timeouts): worth the same
# request again a moment later. kopf drops an event handler's error, and a finished workload
# sends no further event, so the last status write of a job must not be given up on the first.
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
TRANSIENT_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # ~30 s in all, then kopf's own handling

# runPolicy fields a started workload can take in flight; any other spec change is refused.
SAFE_FIELDS = ("suspend", "ttlSecondsAfterFinished", "activeDeadlineSeconds")
# Where those fields live in each workload kind's spec.
WORKLOAD_RUN_POLICY = {"PyTorchJob": ("spec", "runPolicy"), "Job": ("spec",)}


# --- operator setup -------------------------------------------------------------------


def peering_priority() -> int:
    """A kopf peering priority that no other replica has.

    kopf pauses *every* operator that sees a live peer of its own priority, so replicas that
    all kept the default 0 would all stand still. The newest replica gets the highest
    priority (milliseconds since the epoch): in a rolling update the new pod takes over at
    once and the old one stands by until it stops. Random low digits break a tie between
    replicas started in the same millisecond.
    """
    return time.time_ns() // 1_000_000 * 1000 + random.randrange(1000)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf keeps handler progress and the last-handled spec in annotations by default; in
    # status they cannot fight a GitOps tool that owns the manifest (the CRD keeps
    # status.kopf with x-kubernetes-preserve-unknown-fields).
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.lastHandledSpec")
    settings.peering.priority = peering_priority()  # read by kopf at every peering keep-alive
    # The handlers' labels= filter runs client-side; this selector makes the API server send
    # only the workloads this operator labelled, not every Job in the cluster.
    for group, plural in WORKLOAD_RESOURCES:
        settings.watching.label_selectors[group, plural] = JOB_LABEL
    settings.watching.field_selectors["", "events"] = EVENTS_FIELD_SELECTOR
    memo.kube = KubeApi()
    # Per-job locks: the workload watcher and the spec handlers both rewrite status.conditions.
    memo.status_locks = JobLocks()


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> kopf.AiohttpSession | None:
    """One aiohttp session, shared by kopf and our KubeApi, so both use the same credentials."""
    # An explicit KUBECONFIG wins (local runs, tests); in a pod, the service account.
    info = None if os.environ.get("KUBECONFIG") else kopf.login_with_service_account(settings=settings, **kwargs)
    info = info or kopf.login_with_kubeconfig(settings=settings, **kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    memo.kube.connect(session, info.server)
    return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                               expiration=info.expiration, aiohttp_session=session)


# --- small helpers ---------------------------------------------------------------------


class JobLocks:
    """One asyncio lock per job, kept only while a write holds or awaits it: an operator that
    sees jobs created and deleted all day must not keep a lock for each one it ever saw."""

    def __init__(self) -> None:
        self._held: dict[Hashable, tuple[asyncio.Lock, int]] = {}  # key -> (lock, holders and waiters)

    def __len__(self) -> int:
        return len(self._held)

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._held.get(key, (asyncio.Lock(), 0))
        self._held[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._held[key]
            if users == 1:
                del self._held[key]
            else:
                self._held[key] = (lock, users - 1)


def status_path(namespace: str, name: str) -> str:
    return object_path(API_VERSION, KIND, namespace, name) + "/status"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of an object-valued spec field (``Optional`` unwrapped); None for the rest."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    candidate = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 \
        else annotation
    return candidate if isinstance(candidate, type) and issubclass(candidate, BaseModel) else None


def spec_fields(spec: dict | None, model: type[BaseModel] = RewardModelJobSpec, prefix: str = "spec") -> dict:
    """Every field ``model`` declares, by dotted path (``spec.trainer.learningRate``), with its
    value in the raw ``spec`` (None where unset).

    Object sections are descended into, so a field a later schema adds to a section is a path
    of its own; lists and maps (volumes, nodeSelector) are one field each, compared whole.
    """
    spec = spec if isinstance(spec, dict) else {}
    fields: dict = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        section = _section_model(info.annotation)
        if section is not None and isinstance(spec.get(key), (dict, type(None))):
            fields.update(spec_fields(spec.get(key), section, f"{prefix}.{key}"))
        else:
            fields[f"{prefix}.{key}"] = spec.get(key)
    return fields


SAFE_PATHS = frozenset(f"spec.runPolicy.{key}" for key in SAFE_FIELDS)


# A value whose JSON is longer is kept as its digest: the API server refuses an object whose
# annotations total over 256 KiB, and a valid spec holds more (64 dataset paths of any length).
SNAPSHOT_VALUE_LIMIT = 256


def _snapshot_value(value: Any) -> Any:
    text = json.dumps(value, sort_keys=True)
    return value if len(text) <= SNAPSHOT_VALUE_LIMIT else {"sha256": hashlib.sha256(text.encode()).hexdigest()}


def spec_snapshot(spec: dict) -> dict:
    """What the workload is rendered from, field by field: the raw spec as the API server
    stored it (the user's values and the CRD defaults of that day), without the safe fields.

    Raw values, not the operator's parsed ones: a later operator that changes a default must
    not see a change in a job that kept the value it was created with.
    """
    return {path: _snapshot_value(value) for path, value in spec_fields(spec).items() if path not in SAFE_PATHS}


def matches_legacy_hash(spec: dict, legacy_hash: str | None) -> bool:
    """Whether ``spec`` is what an operator that kept only rmjob.dev/spec-hash rendered the
    workload from. Its hashes (the values off their defaults, or the full dump, both without
    the safe fields) still match while the defaults are those of that operator."""
    try:
        parsed = parse_spec(dict(spec))
    except InvalidSpec:
        return False
    changed = parsed.model_dump(by_alias=True, mode="json", exclude_defaults=True)
    run_policy = {k: v for k, v in changed.pop("runPolicy", {}).items() if k not in SAFE_FIELDS}
    full = parsed.model_dump(by_alias=True, mode="json")
    full["runPolicy"] = {k: v for k, v in full["runPolicy"].items() if k not in SAFE_FIELDS}
    hashes = {json.dumps({**changed, "runPolicy": run_policy} if run_policy else changed, sort_keys=True),
              json.dumps(full, sort_keys=True)}
    return legacy_hash in {hashlib.sha256(data.encode()).hexdigest()[:16] for data in hashes}


def unsafe_changes(snapshot: dict, spec: dict) -> list[str]:
    """The fields of ``snapshot`` that ``spec`` sets otherwise, sorted.

    A field the snapshot does not hold was added to the schema after the workload was created:
    the API server fills its default into every existing job, which is no edit of the user's.
    A field the snapshot holds that this schema no longer declares is gone from the CRD too.
    """
    current = spec_snapshot(spec)
    # Stored values are digested again: snapshots written before the digest hold them whole.
    return sorted(path for path, value in snapshot.items()
                  if path in current and current[path] != _snapshot_value(value))


def safe_values(spec: RewardModelJobSpec) -> dict:
    policy = spec.run_policy.model_dump(by_alias=True, mode="json")
    return {key: policy.get(key) for key in SAFE_FIELDS}


def workload_annotations(raw_spec: dict, spec: RewardModelJobSpec) -> dict:
    return {SPEC_SNAPSHOT_ANNOTATION: json.dumps(spec_snapshot(raw_spec), sort_keys=True),
            RUN_POLICY_ANNOTATION: json.dumps(safe_values(spec), sort_keys=True)}


def is_workload(obj: dict, ref: dict) -> bool:
    return obj["kind"] == ref["kind"] and obj["metadata"]["name"] == ref["name"]


def is_ours(obj: dict, owner: dict) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner["metadata"]["uid"] for ref in refs)


def phase_event(owner: dict, phase: str, message: str) -> None:
    kopf.event(owner, type="Warning" if phase == cond.FAILED else "Normal", reason=phase, message=message)


async def update_status(memo: kopf.Memo, namespace: str, name: str, compute: Callable[[dict], dict],
                        uid: str | None = None) -> dict:
    """Read the job, ``compute(job) -> status patch``, merge-patch it; serialised per job.

    With ``uid``, only that incarnation of the job is patched (a job deleted and re-created
    under the same name is another object). Returns the patch (empty when nothing changed or
    the job is gone). Emits an Event when the phase changes.
    """
    async with memo.status_locks.hold((namespace, name)):
        conflicts = 0
        delays = iter(TRANSIENT_RETRY_DELAYS)
        while True:
            try:
                owner = await memo.kube.get(object_path(API_VERSION, KIND, namespace, name))
                if owner is None or (uid is not None and owner["metadata"].get("uid") != uid):
                    return {}
                patch = cond.changed(owner.get("status") or {}, compute(owner))
                if patch:
                    await memo.kube.merge_patch(status_path(namespace, name), {"status": patch})
                break
            except ApiError as e:
                # A write racing another one: recompute from the job as it is now. Left to kopf,
                # an event handler's write would be dropped, a change handler's retried a minute later.
                if e.status == 409:
                    conflicts += 1
                    if conflicts == STATUS_CONFLICT_ATTEMPTS:
                        raise
                    continue
                if e.status not in TRANSIENT_STATUSES:
                    raise
                error: Exception = e
            except (asyncio.TimeoutError, aiohttp.ClientConnectionError) as e:
                error = e
            delay = next(delays, None)
            if delay is None:
                raise error
            logging.getLogger(__name__).warning("status of %s/%s: %s; retrying in %.1f s",
                                                namespace, name, error, delay)
            await asyncio.sleep(delay)
    if patch.get("phase"):
        phase_event(owner, patch["phase"], patch.get("message", ""))
    return patch


async def choose_backend(kube: KubeApi, requested: str) -> str:
    if requested != "auto":
        return requested
    return "pytorchjob" if await kube.serves(*PYTORCHJOB_API) else "job"


class ChildNameTaken(Exception):
    """A child's name is held by an object that is not going away (no owner, or a live one)."""


class ChildNameReleasing(Exception):
    """A child's name is still held by the child of a deleted owner (typically this job's
    predecessor of the same name): Kubernetes' garbage collector deletes it asynchronously."""


async def _owner_alive(kube: KubeApi, ref: dict, namespace: str) -> bool:
    if ref.get("kind") not in PLURALS:
        return True  # an owner we cannot look up: assume it stays
    found = await kube.get(object_path(ref["apiVersion"], ref["kind"], namespace, ref["name"]))
    return found is not None and found["metadata"].get("uid") == ref.get("uid")


async def _holder_stays(kube: KubeApi, existing: dict) -> bool:
    meta = existing["metadata"]
    if meta.get("deletionTimestamp"):
        return False
    refs = meta.get("ownerReferences") or []
    if not refs:
        return True
    for ref in refs:
        if await _owner_alive(kube, ref, meta["namespace"]):
            return True
    return False  # every owner is gone: the garbage collector deletes it


async def create_child(kube: KubeApi, child: dict, owner: dict, logger: logging.Logger) -> None:
    """Create ``child``; an existing one of ours is success (a retried create or a restart).

    Raises :class:`ChildNameReleasing` while the name belongs to an object on its way out,
    :class:`ChildNameTaken` when it belongs to one that stays, and :class:`InvalidSpec` when
    the API server refuses the child as invalid (422): what the spec passes through to the pod
    (volumes, env, tolerations, ...) is only fully validated there, and retrying cannot help.
    """
    kind, name = child["kind"], child["metadata"]["name"]
    try:
        await kube.create(child)
        logger.info("created %s %s", kind, name)
    except ApiError as e:
        if e.status == 422:
            raise InvalidSpec("spec.resources", f"the API server refused {kind} {name}: {e.message}") from None
        if e.status != 409:
            raise
        existing = await kube.get(path_of(child))
        if existing is None:
            raise ChildNameReleasing(f"{kind} {name} was being deleted") from None
        if is_ours(existing, owner):
            return
        if render.is_retained(child) and render.is_retained(existing) and \
                (existing["metadata"].get("labels") or {}).get(JOB_LABEL) == child["metadata"]["labels"][JOB_LABEL]:
            logger.info("reusing %s %s, retained from an earlier job of this name", kind, name)
            return
        if await _holder_stays(kube, existing):
            raise ChildNameTaken(f"{kind} {name} already exists and does not belong to this job; "
                                 "delete it or give the job another name") from None
        raise ChildNameReleasing(f"{kind} {name} still belongs to a deleted owner") from None


async def sync_from_workload(memo: kopf.Memo, namespace: str, name: str, uid: str, workload: dict) -> dict:
    now = cond.now_iso()
    return await update_status(
        memo, namespace, name,
        lambda owner: cond.workload_status_patch(owner, workload["kind"], workload.get("status"), now),
        uid=uid,
    )


async def workload_gone(memo: kopf.Memo, namespace: str, name: str, uid: str, kind: str, workload_name: str,
                        last_status: dict | None) -> dict:
    now = cond.now_iso()
    return await update_status(
        memo, namespace, name,
        lambda owner: cond.workload_gone_patch(owner, kind, workload_name, last_status, now),
        uid=uid,
    )


# --- create / resume -------------------------------------------------------------------


def invalid_spec_patch(owner: dict, err: InvalidSpec) -> dict:
    status = owner.get("status") or {}
    message = str(err)  # "spec.trainer.learningRate: ..." (the field first)
    generation = owner["metadata"].get("generation")
    conditions = cond.set_condition(status.get("conditions") or [], cond.INVALID_SPEC, True, "InvalidSpec",
                                    message, generation, cond.now_iso())
    return {"phase": cond.FAILED, "message": message, "conditions": conditions, "observedGeneration": generation}


def created_patch(owner: dict, spec: RewardModelJobSpec, workload_ref: dict) -> dict:
    status = owner.get("status") or {}
    now = cond.now_iso()
    generation = owner["metadata"].get("generation")
    conditions = status.get("conditions") or []
    if any(c["type"] == cond.INVALID_SPEC for c in conditions):
        conditions = cond.set_condition(conditions, cond.INVALID_SPEC, False, "SpecValid", "", generation, now)
    message = f"created {workload_ref['kind']} {workload_ref['name']}"
    conditions = cond.set_condition(conditions, cond.CREATED, True, "WorkloadCreated", message, generation, now)
    patch = {
        "workload": workload_ref,
        "observedGeneration": generation,
        "startTime": status.get("startTime") or now,
        "topology": {"nodes": spec.resources.nodes, "gpusPerNode": spec.resources.gpus_per_node,
                     "worldSize": spec.world_size},
        "conditions": conditions,
    }
    # First creation, after a wait, or a fixed invalid spec; unless the workload watcher got
    # there first (a workload that fails at once), whose phase must not go back to Pending.
    reported = any(c["type"] in cond.PHASE_CONDITIONS and c["status"] == "True" for c in conditions)
    if not status.get("workload") and not reported:
        patch.update(phase=cond.PENDING, message=message)
    return patch


def waiting_patch(owner: dict, reason: str) -> dict:
    message = f"waiting for the garbage collector: {reason}"
    conditions = cond.set_condition((owner.get("status") or {}).get("conditions") or [], cond.CREATED, False,
                                    "WaitingForOldChildren", message, owner["metadata"].get("generation"),
                                    cond.now_iso())
    return {"phase": cond.PENDING, "message": message, "conditions": conditions}


def name_taken_patch(owner: dict, message: str) -> dict:
    conditions = cond.set_condition((owner.get("status") or {}).get("conditions") or [], cond.CREATED, False,
                                    "ChildNameTaken", message, owner["metadata"].get("generation"), cond.now_iso())
    return {"phase": cond.FAILED, "message": message, "conditions": conditions}


async def reject(memo: kopf.Memo, body: kopf.Body, err: InvalidSpec, logger: logging.Logger) -> None:
    """Invalid spec: phase Failed, an InvalidSpec condition and one Warning event; no retries."""
    logger.warning("invalid spec: %s", err)
    meta = body["metadata"]
    patch = await update_status(memo, meta["namespace"], meta["name"], lambda owner: invalid_spec_patch(owner, err))
    # Already Failed for another reason: the phase event did not fire. Nothing changed (the
    # same invalid spec seen again on an operator restart): it was reported already.
    if patch and not patch.get("phase"):
        kopf.event(body, type="Warning", reason=cond.INVALID_SPEC, message=str(err))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@metrics.instrumented("reconcile")
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Create the children (idempotent) and bring status in line with the workload."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        check_name(name)
        spec = parse_spec(dict(body["spec"]))
    except InvalidSpec as err:
        await reject(memo, body, err, logger)
        return

    # status.workload is recorded only after every child exists, so a job that has it never
    # gets children again: a finished workload removed by its TTL must not train a second time.
    workload_ref = (body.get("status") or {}).get("workload")
    if not workload_ref:
        owner = dict(body)
        backend = await choose_backend(memo.kube, spec.run_policy.backend)
        if spec.storage is not None and spec.storage.existing_claim:
            claim_path = object_path("v1", "PersistentVolumeClaim", namespace, spec.storage.existing_claim)
            try:
                check_existing_claim(spec, await memo.kube.get(claim_path))
            except InvalidSpec as err:
                await reject(memo, body, err, logger)
                return
        children = render.render_children(owner, backend, os.environ.get("RMJOB_TRAINER_IMAGE"))
        kopf.adopt([child for child in children if not render.is_retained(child)], owner=owner, strict=True)
        workload_ref = render.workload_ref(owner, backend)
        try:
            for child in children:
                if is_workload(child, workload_ref):
                    child["metadata"].setdefault("annotations", {}).update(
                        workload_annotations(dict(body["spec"]), spec))
                await create_child(memo.kube, child, owner, logger)
        except ChildNameReleasing as err:
            logger.info("waiting: %s", err)
            await update_status(memo, namespace, name, lambda owner: waiting_patch(owner, str(err)), uid=meta["uid"])
            raise kopf.TemporaryError(str(err), delay=STALE_CHILD_RETRY_SECONDS) from None
        except ChildNameTaken as err:
            logger.warning("%s", err)
            await update_status(memo, namespace, name, lambda owner: name_taken_patch(owner, str(err)),
                                uid=meta["uid"])
            return
        except InvalidSpec as err:
            await reject(memo, body, err, logger)
            return
        await update_status(memo, namespace, name, lambda owner: created_patch(owner, spec, workload_ref))

    path = object_path(workload_ref["apiVersion"], workload_ref["kind"], namespace, workload_ref["name"])
    workload = await memo.kube.get(path)
    if workload is not None and is_ours(workload, body):  # on resume it may have moved on meanwhile
        await sync_from_workload(memo, namespace, name, meta["uid"], workload)
    else:  # deleted (or replaced by another object) while the operator was not watching
        await workload_gone(memo, namespace, name, meta["uid"], workload_ref["kind"], workload_ref["name"], None)


# --- workload -> status ----------------------------------------------------------------


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={JOB_LABEL: kopf.PRESENT})
@kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
@metrics.instrumented("workload_changed")
async def workload_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    owners = [ref for ref in body.metadata.get("ownerReferences") or []
              if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION]
    if not owners:
        return  # labelled like ours, but not created by this operator
    # By uid: a late event of a deleted job's workload must not reach its same-name successor.
    namespace, owner = body.metadata.namespace, owners[0]
    if event["type"] == "DELETED":  # by hand, by its TTL, or with its job (which is then gone)
        await workload_gone(memo, namespace, owner["name"], owner["uid"], body["kind"], body.metadata.name,
                            dict(body.get("status") or {}))
        return
    await sync_from_workload(memo, namespace, owner["name"], owner["uid"], dict(body))


@kopf.on.event("", "v1", "events")
@metrics.instrumented("workload_warned")
async def workload_warned(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A workload's controller cannot create its pods: say so in the job's status, which would
    otherwise stay Pending without a word."""
    involved = body.get("involvedObject") or {}
    if event["type"] == "DELETED" or body.get("reason") not in cond.POD_CREATION_FAILED_REASONS:
        return
    if involved.get("kind") not in ("Job", "PyTorchJob") or not all(
            involved.get(key) for key in ("apiVersion", "namespace", "name")):
        return
    path = object_path(involved["apiVersion"], involved["kind"], involved["namespace"], involved["name"])
    workload = await memo.kube.get(path)
    if workload is None or workload["metadata"].get("uid") != involved.get("uid"):
        return  # an event about an earlier object of that name
    owners = [ref for ref in workload["metadata"].get("ownerReferences") or []
              if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION]
    if not owners:
        return
    now = cond.now_iso()
    await update_status(
        memo, involved["namespace"], owners[0]["name"],
        lambda owner: cond.pod_creation_failed_patch(owner, involved["kind"], body.get("message") or "", now),
        uid=owners[0]["uid"],
    )


# --- spec updates ----------------------------------------------------------------------


def changed_paths(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths of the leaves that differ (``spec.trainer.learningRate``), sorted."""
    if old == new:
        return []
    if isinstance(old, (dict, type(None))) and isinstance(new, (dict, type(None))):
        old, new = old or {}, new or {}
        return [path for key in sorted(old.keys() | new.keys())
                for path in changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")]
    return [prefix]


def run_policy_patch(owner: dict, backend: str, keys: set[str]) -> dict:
    """The workload merge-patch for ``keys`` of runPolicy, with the values render.py gives them."""
    ref = render.workload_ref(owner, backend)
    children = render.render_children(owner, backend, os.environ.get("RMJOB_TRAINER_IMAGE"))
    rendered = next(c for c in children if is_workload(c, ref))
    path = WORKLOAD_RUN_POLICY[ref["kind"]]
    for key in path:
        rendered = rendered.get(key) or {}
    patch: dict = {key: rendered.get(key) for key in sorted(keys)}  # None deletes the field
    for key in reversed(path):
        patch = {key: patch}
    return patch


def refusal_patch(owner: dict, fields: list[str], held_back: list[str]) -> dict:
    status = owner.get("status") or {}
    message = (f"{', '.join(fields)} cannot change once the workload exists; "
               "revert the change or create a new RewardModelJob")
    if held_back:
        message += f" ({', '.join(held_back)} waits until then)"
    conditions = cond.set_condition(status.get("conditions") or [], cond.SPEC_CHANGE_REFUSED, True,
                                    "ImmutableWhileStarted", message, owner["metadata"].get("generation"),
                                    cond.now_iso())
    return {"conditions": conditions}


def accepted_patch(owner: dict) -> dict:
    status = owner.get("status") or {}
    generation = owner["metadata"].get("generation")
    conditions = status.get("conditions") or []
    if any(c["type"] == cond.SPEC_CHANGE_REFUSED for c in conditions):
        conditions = cond.set_condition(conditions, cond.SPEC_CHANGE_REFUSED, False, "SpecApplied",
                                        "the spec matches the workload", generation, cond.now_iso())
    return {"observedGeneration": generation, "conditions": conditions}


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@metrics.instrumented("spec_changed")
async def spec_changed(body: kopf.Body, old: Any, new: Any, memo: kopf.Memo, logger: logging.Logger,
                       **kwargs: Any) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    workload_ref = (body.get("status") or {}).get("workload")
    if not workload_ref:  # nothing started yet (e.g. the spec was invalid): start from scratch
        await reconcile(body=body, memo=memo, logger=logger, **kwargs)
        return

    workload_path = object_path(workload_ref["apiVersion"], workload_ref["kind"], namespace, workload_ref["name"])
    workload = await memo.kube.get(workload_path)
    if workload is None or not is_ours(workload, body):
        # Finished and removed by its TTL, or lost (the watcher failed the job): nothing runs
        # that the edit could change, and nothing is created again.
        logger.info("spec changed, but the workload is gone: nothing to apply")
        return
    annotations = workload["metadata"].get("annotations") or {}
    try:
        spec = parse_spec(dict(body["spec"]))
        refused = []
    except InvalidSpec as err:
        spec, refused = None, [err.field]
    workload_patch: dict = {}
    if spec is not None and SPEC_SNAPSHOT_ANNOTATION not in annotations:
        # Created by an operator that kept only a hash of the spec. Where the spec before this
        # edit still matches it, that spec becomes the snapshot and the edit is checked against
        # it; otherwise (a default changed since, or an earlier edit) no field can be told apart
        # any more and the spec as it is now becomes the snapshot, unchecked. Either once.
        legacy_hash = annotations.get(LEGACY_SPEC_HASH_ANNOTATION)
        hashed = old if matches_legacy_hash(old or {}, legacy_hash) \
            and not matches_legacy_hash(body["spec"], legacy_hash) else None
        snapshot = spec_snapshot(dict(hashed or body["spec"]))
        if hashed:
            # A field the earlier schema lacked is unset in that spec and now holds the default
            # the API server fills in: that is no edit.
            defaults = spec_snapshot(parse_spec(dict(hashed)).model_dump(by_alias=True, mode="json"))
            current = spec_snapshot(dict(body["spec"]))
            snapshot.update({path: current[path] for path, value in snapshot.items()
                             if value is None and current[path] == defaults.get(path)})
        refused = unsafe_changes(snapshot, dict(body["spec"]))
        workload_patch["metadata"] = {"annotations": {SPEC_SNAPSHOT_ANNOTATION: json.dumps(snapshot, sort_keys=True),
                                                      LEGACY_SPEC_HASH_ANNOTATION: None}}
        message = (f"{workload_ref['kind']} {workload_ref['name']} was created by an earlier operator that kept "
                   f"only a hash of the spec: the spec {'before' if hashed else 'of'} generation "
                   f"{meta.get('generation')} is taken as what it runs, and later edits are checked against it")
        logger.info("%s", message)
        kopf.event(body, type="Normal", reason="SpecSnapshotAdopted", message=message)
    elif spec is not None:
        snapshot = json.loads(annotations[SPEC_SNAPSHOT_ANNOTATION])
        refused = unsafe_changes(snapshot, dict(body["spec"]))
    if refused:
        if workload_patch:  # the adopted snapshot, or the next edit could not be checked
            await memo.kube.merge_patch(workload_path, workload_patch)
        held_back = [path for path in changed_paths(old, new) if path in SAFE_PATHS]
        logger.warning("refusing spec change of %s", ", ".join(refused))
        await update_status(memo, namespace, name, lambda owner: refusal_patch(owner, refused, held_back))
        kopf.event(body, type="Warning", reason=cond.SPEC_CHANGE_REFUSED, message=f"refused: {', '.join(refused)}")
        return

    added = {path: value for path, value in spec_snapshot(dict(body["spec"])).items() if path not in snapshot}
    if added:
        # Fields a later schema added hold the default the API server filled in: recorded now,
        # so that changing them later is an edit like any other (it was accepted and not applied).
        workload_patch.setdefault("metadata", {}).setdefault("annotations", {})[SPEC_SNAPSHOT_ANNOTATION] = \
            json.dumps({**snapshot, **added}, sort_keys=True)

    # Nothing immutable differs from the workload (a safe edit, or a refused one reverted).
    # Only the safe fields the user changed since the last apply are sent: Kueue owns
    # ``suspend`` of a queued workload, and rewriting it would bypass admission.
    applied = json.loads(annotations.get(RUN_POLICY_ANNOTATION) or "{}")
    desired = safe_values(spec)
    keys = {key for key in SAFE_FIELDS if applied.get(key) != desired[key]}
    if keys:
        workload_patch.update(run_policy_patch(dict(body), workload_ref["kind"].lower(), keys))
        workload_patch.setdefault("metadata", {}).setdefault("annotations", {})[RUN_POLICY_ANNOTATION] = \
            json.dumps(desired, sort_keys=True)
    if workload_patch:
        await memo.kube.merge_patch(workload_path, workload_patch)
    if keys:
        applied_paths = ", ".join(f"spec.runPolicy.{key}" for key in sorted(keys))
        logger.info("applied %s to the workload", applied_paths)
        kopf.event(body, type="Normal", reason="SpecApplied", message=f"applied {applied_paths}")
    await update_status(memo, namespace, name, accepted_patch)


# --- trainer -> status -----------------------------------------------------------------


@kopf.on.field(GROUP, VERSION, PLURAL, field="status.training")
@metrics.instrumented("training_reported")
def training_reported(body: kopf.Body, old: Any, new: Any, patch: kopf.Patch, **_: Any) -> None:
    """``old`` is the report handled last (kopf keeps it in status.kopf), so an evaluation gets
    one Event however often the job is seen again, operator restarts included."""
    if new:
        previous = dict(old) if old else None
        patch.status.update(cond.training_status(dict(new), previous))
        message = cond.evaluation_message(dict(new), previous)
        if message:
            kopf.event(body, type="Normal", reason="Evaluated", message=message)


# --- metrics ----------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_seen(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Keeps the jobs-by-phase gauge: each job's phase as last watched, gone with the job."""
    uid = body["metadata"]["uid"]
    if event["type"] == "DELETED":
        metrics.JOB_PHASES.forget(uid)
    else:
        metrics.JOB_PHASES.observe(uid, body["metadata"]["namespace"], (body.get("status") or {}).get("phase"))


@kopf.on.startup()
async def prune_jobs_gauge(memo: kopf.Memo, **_: Any) -> None:
    """Jobs deleted while no watch was open (a standby replica) leave the gauge too."""
    if metrics.SERVING.is_set():
        memo.jobs_gauge_pruner = asyncio.create_task(metrics.JOB_PHASES.keep_pruned(memo.kube))
