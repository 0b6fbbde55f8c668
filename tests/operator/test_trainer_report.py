"""Trainer -> operator: StatusReporter patches status.training, the operator copies it out.
And the secret canary: a token in a Secret and in the operator's environment shows up nowhere
the operator writes (objects, events, logs)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import pytest
from kmock_cluster import (
    JOBS, NAMESPACE, Cluster, api, condition, new_job, phase_is, rmj, rmj_path, wait_for,
)

from rmjob_trainer.status import StatusReporter

CANARY = "hf_CANARY_b0a7c1e2d3f4a5b6c7d8e9f0"
SECRETS = {"hub": {"push": True, "repoId": "org/rm", "tokenSecretRef": {"name": "hf-token", "key": "token"}},
           "tracking": {"wandb": {"project": "rm", "apiKeySecretRef": {"name": "wandb", "key": "key"}}}}
REPORT = {"step": 120, "totalSteps": 400, "episode": 3840, "epoch": 0.3, "trainLoss": 0.41,
          "trainAccuracy": 0.82, "evalLoss": 0.45, "evalAccuracy": 0.8, "evalRewardMargin": 1.3}
HUB = {"repo": "org/rm", "revision": "main", "commit": "abc123", "url": "https://huggingface.co/org/rm"}


def reporter_for(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> StatusReporter:
    monkeypatch.setenv("RMJOB_JOB_NAME", "rm-test")
    monkeypatch.setenv("RMJOB_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("RMJOB_KUBE_API", str(cluster.url))
    reporter = StatusReporter.from_env()
    assert reporter is not None
    return reporter


async def test_trainer_reports_become_status_metrics_hub_and_wandb(
        cluster: Cluster, operator: asyncio.Task, monkeypatch: pytest.MonkeyPatch) -> None:
    await api(cluster, "post", rmj_path(), new_job(**SECRETS))
    await wait_for(phase_is(cluster, "Pending"))
    reporter = reporter_for(cluster, monkeypatch)

    # urllib blocks, and KMock serves from this event loop: report from a thread.
    assert await asyncio.to_thread(reporter.report, REPORT)
    await wait_for(lambda: rmj(cluster)["status"].get("metrics") == REPORT, message="status.metrics")
    assert not await asyncio.to_thread(reporter.report, {**REPORT, "step": 121})  # throttled

    final = {**REPORT, "step": 400, "hub": HUB, "wandbUrl": "https://wandb.ai/org/rm/runs/1", "done": True}
    assert await asyncio.to_thread(reporter.report, final, True)
    await wait_for(lambda: rmj(cluster)["status"].get("hub") == HUB, message="status.hub")
    status = rmj(cluster)["status"]
    assert status["metrics"]["step"] == 400
    assert status["wandb"] == {"url": "https://wandb.ai/org/rm/runs/1"}
    assert status["training"]["done"] is True and status["training"]["updateTime"].endswith("Z")
    assert status["phase"] == "Pending"  # reports never touch the phase


async def test_secret_values_never_leave_their_secret(
        cluster: Cluster, operator: asyncio.Task, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", CANARY)  # as if the operator's own pod had it
    monkeypatch.setenv("WANDB_API_KEY", CANARY)
    encoded = base64.b64encode(CANARY.encode()).decode()
    for name, key in (("hf-token", "token"), ("wandb", "key")):
        await api(cluster, "post", f"/api/v1/namespaces/{NAMESPACE}/secrets",
                  {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE},
                   "data": {key: encoded}})

    # Drive the job through everything that writes: create, run, report, a refused edit, finish.
    await api(cluster, "post", rmj_path(), new_job(**SECRETS))
    await wait_for(lambda: cluster.get(JOBS, "rm-test"))
    await api(cluster, "patch", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test/status", {"status": {"active": 2, "ready": 2}})
    await wait_for(phase_is(cluster, "Running"))
    await asyncio.to_thread(reporter_for(cluster, monkeypatch).report, {**REPORT, "hub": HUB}, True)
    await wait_for(lambda: rmj(cluster)["status"].get("hub"))
    await api(cluster, "patch", rmj_path("rm-test"), {"spec": {"hub": {**SECRETS["hub"], "repoId": "org/other"}}})
    await wait_for(lambda: condition(rmj(cluster), "SpecChangeRefused"))
    complete = {"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "done"}
    await api(cluster, "patch", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/rm-test/status",
              {"status": {"active": 0, "conditions": [complete]}})
    await wait_for(phase_is(cluster, "Succeeded"))
    await wait_for(lambda: len(cluster.events_for("rm-test")) >= 4)

    pod_env = cluster.get(JOBS, "rm-test")["spec"]["template"]["spec"]["containers"][0]["env"]
    hf_token = next(e for e in pod_env if e["name"] == "HF_TOKEN")
    assert hf_token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}

    written = [version for (resource, _, _), obj in cluster.objects.items() if resource.plural != "secrets"
               for version in obj.history if version is not None]
    assert len(written) > 10
    for text in [json.dumps(dict(v), default=str) for v in written] + [caplog.text]:
        assert CANARY not in text and encoded not in text
