"""``python -m rmjob_operator`` as a real process against KMock: it reconciles a job, serves
liveness, logs JSON lines, and exits cleanly on SIGTERM (what a pod's termination sends)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys

import aiohttp
import pytest

from kmock_cluster import CONFIGMAPS, JOBS, NAMESPACE, Cluster, api, new_job, phase_is, rmj, rmj_path, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def read_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    """Drain a pipe as the process writes it (a full pipe would block the operator)."""
    while line := await stream.readline():
        into.append(line.decode())


def owned_by(obj: dict | None, owner: dict) -> bool:
    refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
    return any(ref["uid"] == owner["metadata"]["uid"] for ref in refs)


@pytest.mark.timeout(60)
async def test_operator_process_reconciles_serves_liveness_and_stops_on_sigterm(
        cluster: Cluster) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    await api(cluster, "post", "/api/v1/namespaces", namespace)  # kopf serves only namespaces that exist
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    # The API server runs in this test's event loop: only an asyncio subprocess leaves it serving.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmjob_operator", "--namespace", NAMESPACE, "--liveness", liveness,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # KUBECONFIG: set by the cluster fixture
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    readers = [asyncio.create_task(read_lines(stream, lines)) for stream in (proc.stdout, proc.stderr)]
    try:
        await api(cluster, "post", rmj_path(), new_job())
        await wait_for(phase_is(cluster, "Pending"), timeout=15, message="phase Pending")
        owner = rmj(cluster)
        assert owned_by(cluster.get(CONFIGMAPS, "rm-test-config"), owner)
        assert owned_by(cluster.get(JOBS, "rm-test"), owner)

        async with aiohttp.ClientSession() as session, session.get(liveness) as resp:
            assert resp.status == 200

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*readers)
        print("".join(lines))  # the operator's logs, shown by pytest if the test fails

    records = [json.loads(line) for line in lines]  # every line is one JSON object
    created = next(r for r in records if r["message"] == "created Job rm-test")
    assert created["severity"] == "info" and created["timestamp"]
    assert created["object"] == {**created["object"], "kind": "RewardModelJob", "name": "rm-test",
                                 "namespace": NAMESPACE, "uid": owner["metadata"]["uid"]}
    assert any(r["message"].startswith("Signal SIGTERM is received") for r in records)
