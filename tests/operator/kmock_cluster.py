"""KMock + kopf harness: an in-memory Kubernetes API, the real operator, and test helpers.

KMock stores objects and serves list/watch/patch/delete, but is no full API server; the
``Cluster`` subclass adds what the operator relies on (uid, resourceVersion, generation,
generateName, the status subresource split, core discovery kubectl can read). Tests play the
controllers KMock lacks:
Kubeflow/the Job controller (patching workload status), and the garbage collector
(``collect_garbage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import functools
import itertools
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import kmock
import kopf
import pytest
import yaml
from kmock._internal import parsing

import rmjob_operator.handlers  # noqa: F401  # registers the handlers in kopf's default registry
from rmjob_operator.kube import KubeApi

REPO = pathlib.Path(__file__).resolve().parents[2]
OUR_CRD = REPO / "manifests" / "crd.yaml"
KOPF_PEERING_CRDS = REPO / "manifests" / "kopf-peerings.yaml"
PYTORCHJOB_CRD = REPO.parent / "shared" / "reference" / "crds" / "kubeflow.org_pytorchjobs.v1.9.0.yaml"
NAMESPACE = "team-a"

RMJ = "rmjob.dev/v1alpha1/rewardmodeljobs"
PYTORCHJOBS = "kubeflow.org/v1/pytorchjobs"
JOBS = "batch/v1/jobs"
CONFIGMAPS = "v1/configmaps"
EVENTS = "v1/events"


class Cluster(kmock.KubernetesEmulator):
    """KMock with the bits of API-server behaviour the operator and kopf depend on."""

    _versions = itertools.count(1)

    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                self._on_create(request.resource, data)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._on_patch(request, data)
        return await super()._handle(request)

    def _on_create(self, resource: kmock.resource, obj: dict) -> None:
        meta = obj.setdefault("metadata", {})
        if "name" not in meta and "generateName" in meta:
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1,
                    creationTimestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        if self._has_status_subresource(resource):
            obj.pop("status", None)

    def _on_patch(self, request: kmock.Request, patch: dict) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # KMock answers 404
        current = self.objects[key]
        if self._has_status_subresource(request.resource):
            if request.subresource == "status":
                for field in list(patch):
                    if field != "status":
                        del patch[field]
            else:
                patch.pop("status", None)
        meta = patch.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._versions))
        if "spec" in patch:
            meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1

    async def _serve_version(self, request: kmock.Request) -> Any:
        # KMock names the core group/version "/v1" in /api/v1's APIResourceList; kubectl keys
        # discovered resources by that string and looks them up as "v1", so without this it
        # finds no core kind ("no matches for kind PersistentVolumeClaim in version v1").
        payload = await super()._serve_version(request)
        if payload.get("groupVersion") == "/v1":
            payload["groupVersion"] = "v1"
        return payload

    def register_crd(self, crd: dict) -> None:
        """Serve the CRD's resource (discovery, verbs) and store the CRD object itself."""
        spec = crd["spec"]
        for version in spec["versions"]:
            subresources = set((version.get("subresources") or {}).keys())
            self.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = kmock.ResourceInfo(
                kind=spec["names"]["kind"], singular=spec["names"].get("singular"),
                namespaced=spec["scope"] == "Namespaced", shortnames=spec["names"].get("shortNames", []),
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                subresources=subresources,
            )
        self.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = {
            **crd, "metadata": {**crd["metadata"], "uid": str(uuid.uuid4()), "resourceVersion": "1"},
        }

    def get(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict | None:
        """The live object as a plain dict, or None (not yet created, or deleted)."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return dict(self.objects[key].raw)

    def live(self, resource: str, namespace: str = NAMESPACE) -> list[dict]:
        return [dict(obj.raw) for (res, ns, _), obj in self.objects.items()
                if res == kmock.resource(resource) and ns == namespace and not obj.deleted]

    def events_for(self, name: str) -> list[dict]:
        return [e for e in self.live(EVENTS) if e.get("involvedObject", {}).get("name") == name]


@functools.cache
def _load_documents(path: pathlib.Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]


def load_documents(path: pathlib.Path) -> list[dict]:
    return copy.deepcopy(_load_documents(path))


def load_yaml(path: pathlib.Path) -> dict:
    (document,) = load_documents(path)
    return document


AnyCluster = TypeVar("AnyCluster", bound=Cluster)


def _parse_path_with_namespaces(original: Callable[[str], parsing.ParsedPath]) -> Callable[[str], parsing.ParsedPath]:
    """KMock 0.8 takes the "namespaces" of /api/v1/namespaces[/NAME] for the prefix of a
    namespaced path and fails; kopf lists and watches namespaces (even for an exact
    --namespace: it falls back to the given names only when the list is forbidden)."""
    def parse_path(path: str) -> parsing.ParsedPath:
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=(parts[3:] or [None])[0])
        return original(path)
    return parse_path


@contextlib.asynccontextmanager
async def emulated_cluster(cluster_class: type[AnyCluster], monkeypatch: pytest.MonkeyPatch,
                           tmp_path: pathlib.Path, crds: tuple[pathlib.Path, ...] = (OUR_CRD,),
                           ) -> AsyncIterator[AnyCluster]:
    """A served, empty cluster with the built-in resources and ``crds``; KUBECONFIG points to it
    (for kopf and kubectl), in the namespace the tests use."""
    monkeypatch.setattr(parsing, "parse_path", _parse_path_with_namespaces(parsing.parse_path))
    async with cluster_class() as emulator, kmock.Server(emulator):
        emulator.resources.load_bundled()
        for path in crds:
            for crd in load_documents(path):
                emulator.register_crd(crd)
        kubeconfig = tmp_path / f"kubeconfig-{emulator.url.port}"  # one per cluster a test starts
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url)}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NAMESPACE}}],
            "users": [{"name": "kmock", "user": {}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield emulator


@contextlib.asynccontextmanager
async def running_operator(namespace: str = NAMESPACE, peering: str | None = None,
                           identity: str | None = None) -> AsyncIterator[asyncio.Task]:
    """The real operator (handlers.py, kopf's default registry) as an asyncio task; standalone,
    or one replica of the peering group ``peering`` (as ``--peering``) known as ``identity``."""
    ready = asyncio.Event()
    settings = kopf.OperatorSettings()
    # Every resource is declared before the operator starts: one discovery at start-up
    # suffices, and no periodic rescans slow the tests.
    settings.scanning.disabled = True
    task = asyncio.create_task(kopf.operator(
        standalone=peering is None, peering_name=peering, identity=identity,
        namespaces=[namespace], clusterwide=False, settings=settings, ready_flag=ready,
    ))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield task
    finally:
        # Cancel rather than set the stop flag: kopf would give every task started after it,
        # KMock's open watch streams included, 5 s to finish before cancelling them anyway.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def crash_after_workload_created(create_job: Callable[[], Awaitable[Any]]) -> None:
    """Run an operator that dies after creating a job's children but before recording its
    workload (Job backend): ``create_job()`` submits the job; returns once the operator is gone."""
    original_create = KubeApi.create
    workload_created = asyncio.Event()

    async def create_then_hang_after_workload(self: KubeApi, obj: dict) -> dict:
        result = await original_create(self, obj)
        if obj["kind"] == "Job":
            workload_created.set()
            await asyncio.Event().wait()  # the operator dies here
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KubeApi, "create", create_then_hang_after_workload)
        async with running_operator() as task:
            await create_job()
            await asyncio.wait_for(workload_created.wait(), 10)
            task.cancel()  # a crash: no graceful shutdown
            with pytest.raises(asyncio.CancelledError):
                await task


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {message or predicate}")
        await asyncio.sleep(0.05)


async def collect_garbage(cluster: Cluster) -> list[str]:
    """Play Kubernetes' garbage collector: delete objects whose owner no longer exists."""
    uids = {obj.get("metadata", {}).get("uid") for obj in cluster.objects.values() if not obj.deleted}
    collected = []
    for (resource, namespace, name), obj in list(cluster.objects.items()):
        refs = obj.get("metadata", {}).get("ownerReferences") or []
        if obj.deleted or not refs or any(ref["uid"] in uids for ref in refs):
            continue
        prefix = "/api" if resource.group == "" else f"/apis/{resource.group}"
        await cluster.delete(f"{prefix}/{resource.version}/namespaces/{namespace}/{resource.plural}/{name}")
        collected.append(f"{obj['kind'] if 'kind' in obj else resource.plural}/{name}")
    return collected


def rmj_path(name: str | None = None, namespace: str = NAMESPACE) -> str:
    path = f"/apis/rmjob.dev/v1alpha1/namespaces/{namespace}/rewardmodeljobs"
    return f"{path}/{name}" if name else path


def new_job(name: str = "rm-test", **sections: Any) -> dict:
    """A small valid RewardModelJob; ``sections`` replace whole spec sections."""
    spec: dict[str, Any] = {
        "trainer": {"modelNameOrPath": "EleutherAI/pythia-14m",
                    "datasetMixer": {"trl-internal-testing/sentiment-trl-style": 1.0},
                    "learningRate": 3e-6},
        "resources": {"nodes": 2, "gpusPerNode": 4},
        **sections,
    }
    return {"apiVersion": "rmjob.dev/v1alpha1", "kind": "RewardModelJob",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


async def api(cluster: Cluster, method: str, path: str, body: dict | None = None) -> dict:
    """One API call as a client (kubectl, Kubeflow, the Job controller) would make it."""
    headers = {"Content-Type": "application/merge-patch+json"} if method == "patch" else {}
    async with cluster.request(method, path, json=body, headers=headers) as resp:
        data = await resp.json(content_type=None)
        assert resp.status < 400, data
        return data


def rmj(cluster: Cluster, name: str = "rm-test") -> dict:
    return cluster.get(RMJ, name) or {}


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def phase_is(cluster: Cluster, phase: str, name: str = "rm-test") -> Callable[[], bool]:
    return lambda: (rmj(cluster, name).get("status") or {}).get("phase") == phase
