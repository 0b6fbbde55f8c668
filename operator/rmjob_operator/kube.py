"""A minimal async Kubernetes API client for the few calls kopf does not make for us.

kopf patches the object a handler runs for; creating children, reading the workload
and patching the *owner* from a child's handler need our own calls. Rather than add the
official client (and its second auth stack), this reuses the aiohttp session that the
operator's login handler gives kopf (see ``handlers.login``), so both share credentials.
"""

from __future__ import annotations

import aiohttp

# The kinds the operator touches, to their REST plural and API path prefix.
PLURALS = {
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "PyTorchJob": "pytorchjobs",
    "RewardModelJob": "rewardmodeljobs",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def group_path(api_version: str) -> str:
    return f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    path = f"{group_path(api_version)}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def path_of(obj: dict) -> str:
    meta = obj["metadata"]
    return object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])


class KubeApi:
    """Holds the current session; ``connect`` swaps it in when kopf re-runs the login handler."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    def connect(self, session: aiohttp.ClientSession, server: str) -> None:
        self._session, self._server = session, server.rstrip("/")

    async def _request(self, method: str, path: str, json: dict | None = None,
                       content_type: str = "application/json") -> dict:
        assert self._session is not None, "KubeApi used before the login handler ran"
        headers = {"Content-Type": content_type}
        async with self._session.request(method, self._server + path, json=json, headers=headers) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else {}
            if resp.status >= 400:
                body = body if isinstance(body, dict) else {}
                raise ApiError(resp.status, body.get("reason", resp.reason or ""), body.get("message", ""))
            return body

    async def get(self, path: str) -> dict | None:
        """The object at ``path``, or None when it does not exist."""
        try:
            return await self._request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return await self._request("POST", object_path(obj["apiVersion"], obj["kind"], meta["namespace"]), obj)

    async def merge_patch(self, path: str, patch: dict) -> dict:
        return await self._request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def serves(self, api_version: str, plural: str) -> bool:
        """Whether the cluster serves ``plural`` in ``api_version`` (API discovery; needs no RBAC)."""
        resources = await self.get(group_path(api_version))
        return any(r.get("name") == plural for r in (resources or {}).get("resources", []))
