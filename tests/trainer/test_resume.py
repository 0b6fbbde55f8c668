"""Kill a run with SIGKILL after a checkpoint, rerun the same command: it resumes and ends
with the same final metrics as a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest


def _command(model_dir, dataset_dir, output_dir) -> list[str]:
    return [
        sys.executable, "-m", "rmjob_trainer",
        "--dataset_mixer", json.dumps({str(dataset_dir): 1.0}), "--model_name_or_path", str(model_dir),
        "--sanity_check", "--sanity_check_max_samples", "60", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "30", "--num_evals", "2",
        "--checkpointing_steps", "4", "--checkpoints_total_limit", "2", "--output_dir", str(output_dir),
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.xdist_group("distributed")  # timing-sensitive: not next to the multi-process tests
def test_killed_run_resumes_to_the_same_final_metrics(tiny_model_dir, bundled_dataset_dir, tmp_path):
    interrupted = tmp_path / "interrupted"
    command = _command(tiny_model_dir, bundled_dataset_dir, interrupted)
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (interrupted / "checkpoints/step_4").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert not (interrupted / "metrics.json").exists()

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    uninterrupted = tmp_path / "uninterrupted"
    reference = subprocess.run(_command(tiny_model_dir, bundled_dataset_dir, uninterrupted), env=ENV,
                               capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr[-3000:]

    got = json.loads((interrupted / "metrics.json").read_text())
    want = json.loads((uninterrupted / "metrics.json").read_text())
    # The resumed run keeps the interrupted run's name (W&B run, Hub revision); names carry
    # the start time, so the uninterrupted run's differs.
    assert f"run {got.pop('run_name')}:" in (tmp_path / "first.log").read_text()
    want.pop("run_name")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    kept = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert len(kept) == 2 and all(name.startswith("step_") for name in kept)  # no .tmp leftovers
