"""KubeApi against a local HTTP server that answers as a loaded API server does."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from rmjob_operator import kube
from rmjob_operator.kube import ApiError, KubeApi

CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "ns", "name": "cm"}}
THROTTLED = "Too many requests, please try again later.\n"  # the priority-and-fairness filter's body


async def call(answers: list, request):
    """Serve ``answers`` (functions making responses) in order on 127.0.0.1, the last one from
    then on; run ``request(api)``; return its result (or ApiError) and the methods received."""
    hits = []

    async def handle(http_request: web.Request) -> web.Response:
        hits.append(http_request.method)
        return answers[min(len(hits), len(answers)) - 1]()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            api = KubeApi()
            api.connect(session, f"http://127.0.0.1:{port}")
            try:
                return await request(api), hits
            except ApiError as e:
                return e, hits
    finally:
        await runner.cleanup()


def throttled() -> web.Response:
    return web.Response(status=429, text=THROTTLED, headers={"Retry-After": "0"})


def test_a_throttled_request_is_sent_again_after_retry_after():
    def created():
        return web.json_response({**CONFIGMAP, "metadata": {**CONFIGMAP["metadata"], "uid": "u1"}}, status=201)

    result, hits = asyncio.run(call([throttled, throttled, created], lambda api: api.create(CONFIGMAP)))
    assert result["metadata"]["uid"] == "u1"
    assert hits == ["POST"] * 3


def test_throttling_that_does_not_end_is_an_api_error_429_with_the_servers_text(monkeypatch):
    monkeypatch.setattr(kube, "THROTTLED_RETRIES", 2)
    result, hits = asyncio.run(call([throttled], lambda api: api.get("/api/v1/namespaces/ns/configmaps/cm")))
    assert isinstance(result, ApiError)
    assert (result.status, result.message) == (429, THROTTLED.strip())
    assert len(hits) == 3


def test_a_plain_text_error_is_an_api_error_not_a_decoding_error():
    def unavailable():
        return web.Response(status=503, text="upstream connect error", reason="Service Unavailable")

    result, hits = asyncio.run(call([unavailable], lambda api: api.get("/api/v1/namespaces/ns/configmaps/cm")))
    assert isinstance(result, ApiError)
    assert (result.status, result.reason, result.message) == (503, "Service Unavailable", "upstream connect error")
    assert hits == ["GET"]


def test_a_status_object_gives_its_reason_and_message():
    status = {"kind": "Status", "reason": "AlreadyExists", "message": 'configmaps "cm" already exists'}
    result, _ = asyncio.run(call([lambda: web.json_response(status, status=409)], lambda api: api.create(CONFIGMAP)))
    assert (result.status, result.reason, result.message) == (409, "AlreadyExists", 'configmaps "cm" already exists')


@pytest.mark.parametrize(("header", "seconds"), [(None, 1.0), ("2", 2.0), ("soon", 1.0), ("3600", 10.0), ("-1", 0.0)])
def test_retry_after_is_bounded(header, seconds):
    assert kube._retry_after(header) == seconds
