"""A minimal async Kubernetes API client for the few calls kopf does not make for us.

kopf patches the object a handler runs for; creating children, reading the workload
and patching the *owner* from a child's handler need our own calls. Rather than add the
official client (and its second auth stack), this reuses the aiohttp session that the
operator's login handler gives kopf (see ``handlers.login``), so both share credentials.
"""

from __future__ import annotations

import asyncio
import json as jsonlib

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


# An API server shedding load (priority and fairness) answers 429 with Retry-After and a
# plain-text body; like client-go, wait as told and try again, up to its 10 retries.
THROTTLED_RETRIES = 10
MAX_RETRY_AFTER_SECONDS = 10.0


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def _api_error(status: int, reason: str, text: str) -> ApiError:
    """The API server's Status object when the body is one, else its text (a proxy's or a
    load-shedding filter's plain-text answer)."""
    try:
        body = jsonlib.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return ApiError(status, body.get("reason", reason), body.get("message", ""))
    return ApiError(status, reason, text.strip())


def _retry_after(header: str | None) -> float:
    try:
        seconds = float(header) if header else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


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
        retries = 0
        while True:
            async with self._session.request(method, self._server + path, json=json, headers=headers) as resp:
                text = await resp.text()
                if resp.status < 400:
                    return jsonlib.loads(text) if text else {}
                if resp.status != 429 or retries == THROTTLED_RETRIES:
                    raise _api_error(resp.status, resp.reason or "", text)
                delay = _retry_after(resp.headers.get("Retry-After"))
            retries += 1
            await asyncio.sleep(delay)

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
