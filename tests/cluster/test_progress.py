"""status.progress, the Progress column and one Event per evaluation (issue 9, item 5), from a
real trainer process (run by the pod runner) reporting to the real control plane.
"""

from __future__ import annotations

import json
import time

import pytest

from rmj import get_json, rmj, status_of, tiny_training_data, tiny_training_spec, wait_for_phase, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TRAINING_TIMEOUT_S = 900
NAME = "rm-progress"


def job_spec(data_dir) -> dict:
    """One CPU pod, 1,500 steps, evaluated twice (steps 750 and 1,500): long enough for several
    status reports (at most one per 10 s) on a quiet machine too, where the 300 steps this
    test once ran ended within one interval, leaving only the first and the last report."""
    return tiny_training_spec(data_dir, trainer={"numTrainEpochs": 30})


def evaluated_events(kubectl, namespace: str) -> list[dict]:
    events = get_json(kubectl, "events", "-n", namespace, "--field-selector",
                      f"reason=Evaluated,involvedObject.name={NAME}")["items"]
    return [e for e in events for _ in range(e.get("count") or 1)]


@pytest.mark.timeout(TRAINING_TIMEOUT_S + 300)
def test_progress_eta_and_one_event_per_evaluation(host_rendezvous_port, kubectl, namespace, pod_runner, rmj_crd,
                                                   start_operator, tmp_path):
    operator = start_operator([namespace])
    kubectl("apply", "-f", "-", input=json.dumps(rmj(NAME, namespace, job_spec(tiny_training_data(tmp_path / "node")))))

    seen: list[dict] = []
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while (status := status_of(kubectl, namespace, NAME)).get("phase") not in ("Succeeded", "Failed"):
        if status.get("progress") and status["progress"] not in seen:
            seen.append(status["progress"])
        assert time.monotonic() < deadline, f"no end of training: {status}"
        time.sleep(1)
    status = wait_for_phase(kubectl, namespace, NAME, "Succeeded", 60, operator)

    # Mid-run: a percentage on its way, and (from the second report on) a time left.
    running = [p for p in seen if p.get("percentage", 100) < 100]
    assert running, seen
    assert [p["percentage"] for p in running] == sorted(p["percentage"] for p in running)
    assert any(isinstance(p.get("estimatedRemainingSeconds"), int) and p["estimatedRemainingSeconds"] > 0
               for p in running), seen
    assert status["progress"] == {"percentage": 100, "estimatedRemainingSeconds": 0}
    table = kubectl("get", "rmj", NAME, "-n", namespace).stdout.splitlines()
    assert "PROGRESS" in table[0].split() and table[1].split()[table[0].split().index("PROGRESS")] == "100"

    # One Event per evaluation, with its accuracy (the trainer's own log has the values).
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={NAME}")["items"]
    (pod,) = pods
    log_lines = (pod_runner.workdir / namespace / pod["metadata"]["name"] / "volumes" / "rmjob-output"
                 / "log.jsonl").read_text().splitlines()
    accuracies = [json.loads(line)["eval/rm/accuracy"] for line in log_lines if "eval/rm/accuracy" in line]
    assert len(accuracies) == 2
    def two_events():
        events = evaluated_events(kubectl, namespace)
        return events if len(events) >= 2 else None

    events = wait_until(two_events, 60, "two Evaluated events")
    assert sorted(e["message"].split(",")[0] for e in events) == \
        sorted(f"evaluation accuracy {accuracy:.4f}" for accuracy in accuracies)
    assert all(e["type"] == "Normal" for e in events)

    # Seen again by a restarted operator: no second Event for the same evaluations.
    assert operator.stop() == 0
    restarted = start_operator([namespace])
    wait_until(lambda: "Resuming is processed" in restarted.log(), 60, "the restarted operator resuming the job")
    time.sleep(5)
    assert len(evaluated_events(kubectl, namespace)) == 2
