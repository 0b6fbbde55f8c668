"""A plain-HTTP proxy on 127.0.0.1 in front of the local API server, for one operator process:
it records every request (method and URL, query included) and answers chosen ones itself
(fault injection), so a test sees what the operator asks the real API server and how it copes
with an answer the server gives only under contention."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass
class Fault:
    """Answer the next ``count`` requests for which ``matches(method, url, body)`` holds with ``status``."""

    matches: Callable[[str, str, bytes], bool]
    status: int
    reason: str
    count: int = 1
    served: int = 0


class ApiProxy:
    def __init__(self, upstream: str, ca_file: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_file = ca_file
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> ApiProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Open watch streams end with the test; nothing to drain.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self._session.close()  # ends the upstream watch streams the handlers are relaying
        await self._runner.cleanup()
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        url = str(request.rel_url)
        self.requests.append((request.method, url))
        body = await request.read()
        for fault in self.faults:
            if fault.served < fault.count and fault.matches(request.method, url, body):
                fault.served += 1
                status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": fault.reason,
                          "message": f"injected by the test proxy: {fault.reason}", "code": fault.status}
                return web.Response(status=fault.status, text=json.dumps(status), content_type="application/json")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with self._session.request(request.method, self.upstream + url, data=body or None,
                                         headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS})
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():  # watch streams: as they come
                    await response.write(chunk)
            except (ConnectionResetError, aiohttp.ClientError):
                return response
            await response.write_eof()
            return response
