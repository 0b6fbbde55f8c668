"""status.progress and the evaluation Events, from the trainer's reports (pure: conditions.py)."""

from __future__ import annotations

from rmjob_operator import conditions as cond

REPORT = {"step": 30, "totalSteps": 200, "updateTime": "2026-01-01T10:00:40Z", "trainLoss": 0.5}
BEFORE = {"step": 20, "totalSteps": 200, "updateTime": "2026-01-01T10:00:20Z", "trainLoss": 0.6}


def test_percentage_and_time_left_at_the_rate_between_two_reports():
    # 10 steps in 20 s, 170 steps left: 340 s.
    assert cond.progress(REPORT, BEFORE) == {"percentage": 15, "estimatedRemainingSeconds": 340}


def test_first_report_has_a_percentage_and_no_estimate():
    # None deletes a stale estimate (an earlier attempt's) in the merge patch.
    assert cond.progress(REPORT, None) == {"percentage": 15, "estimatedRemainingSeconds": None}


def test_a_resumed_run_going_back_in_steps_has_no_estimate():
    resumed = {**REPORT, "step": 10, "updateTime": "2026-01-01T10:05:00Z"}
    assert cond.progress(resumed, REPORT) == {"percentage": 5, "estimatedRemainingSeconds": None}


def test_reports_without_time_or_steps():
    assert cond.progress({**REPORT, "updateTime": "not a time"}, BEFORE)["estimatedRemainingSeconds"] is None
    assert cond.progress({"trainLoss": 0.1}, None) is None
    assert cond.progress({"step": 3, "totalSteps": 0}, None) is None


def test_done_is_complete():
    assert cond.progress({**REPORT, "done": True}, BEFORE) == {"percentage": 100, "estimatedRemainingSeconds": 0}


def test_training_status_carries_progress():
    status = cond.training_status(REPORT, BEFORE)
    assert status["progress"] == {"percentage": 15, "estimatedRemainingSeconds": 340}
    assert status["metrics"] == {"step": 30, "totalSteps": 200, "trainLoss": 0.5}


EVAL = {"evalLoss": 0.41, "evalAccuracy": 0.8125, "evalRewardMargin": 1.2}


def test_an_evaluation_is_announced_once():
    first = {**REPORT, **EVAL}
    assert cond.evaluation_message(first, BEFORE) == \
        "evaluation accuracy 0.8125, loss 0.4100 (reported at step 30/200)"
    # Later reports repeat the latest evaluation: no new Event.
    assert cond.evaluation_message({**first, "step": 31}, first) is None
    assert cond.evaluation_message({**first, "step": 40, "evalAccuracy": 0.85, "evalLoss": 0.39}, first) == \
        "evaluation accuracy 0.8500, loss 0.3900 (reported at step 40/200)"


def test_no_evaluation_no_message():
    assert cond.evaluation_message(REPORT, BEFORE) is None
    assert cond.evaluation_message({**REPORT, "evalAccuracy": "high"}, None) is None
