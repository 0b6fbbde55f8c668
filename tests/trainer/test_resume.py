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


# --- what a checkpoint may be resumed by ------------------------------------------------------
def _config(model_dir, dataset_dir, output_dir, **overrides):
    from rmjob_trainer.config import RewardConfig

    # 16 pairs in batches of 2: 8 steps; checkpoints at steps 3 and 6.
    values = dict(dataset_mixer={str(dataset_dir): 1.0}, model_name_or_path=str(model_dir), sanity_check=True,
                  sanity_check_max_samples=16, learning_rate=1e-3, per_device_train_batch_size=2,
                  per_device_eval_batch_size=16, num_evals=1, checkpointing_steps=3, output_dir=str(output_dir),
                  run_name="first")
    return RewardConfig(**{**values, **overrides})


def _log_steps(output_dir) -> list[int]:
    return [json.loads(line)["step"] for line in open(output_dir / "log.jsonl")]


@pytest.fixture
def killed_after_last_checkpoint(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """A finished 8-step run whose metrics.json is removed: as if killed after step_6 was saved."""
    from rmjob_trainer.train import train

    train(_config(tiny_model_dir, bundled_dataset_dir, tmp_path))
    (tmp_path / "metrics.json").unlink()
    return tmp_path


@pytest.mark.parametrize("change,named", [
    ({"learning_rate": 2e-3}, "learning_rate 0.001 there, 0.002 now"),
    ({"per_device_train_batch_size": 4}, "per_device_train_batch_size 2 there, 4 now"),
    ({"lr_scheduler_type": "cosine", "seed": 2}, 'seed 1 there, 2 now; lr_scheduler_type "linear" there, "cosine" now'),
    ({"total_episodes": 24}, "total_episodes 16 there, 24 now"),
])
def test_resume_with_other_optimization_settings_is_refused(
        change, named, killed_after_last_checkpoint, tiny_model_dir, bundled_dataset_dir):
    from rmjob_trainer import ConfigError
    from rmjob_trainer.train import train

    output_dir = killed_after_last_checkpoint
    log_before = (output_dir / "log.jsonl").read_text()
    cfg = _config(tiny_model_dir, bundled_dataset_dir, output_dir, **change)
    with pytest.raises(ConfigError, match=r"^cannot resume from .*step_6: it was trained with other settings") as error:
        train(cfg)
    assert named in str(error.value) and "\n" not in str(error.value)
    assert (output_dir / "log.jsonl").read_text() == log_before and not (output_dir / "metrics.json").exists()


def test_checkpoint_without_recorded_settings_is_refused(killed_after_last_checkpoint, tiny_model_dir,
                                                         bundled_dataset_dir):
    from rmjob_trainer import ConfigError
    from rmjob_trainer.train import train

    state_file = killed_after_last_checkpoint / "checkpoints/step_6/trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"does not record the settings it was trained with"):
        train(_config(tiny_model_dir, bundled_dataset_dir, killed_after_last_checkpoint))


def test_finished_model_is_not_replaced_by_resuming_an_older_checkpoint(tiny_model_dir, bundled_dataset_dir,
                                                                       tmp_path):
    from rmjob_trainer import ConfigError
    from rmjob_trainer.train import train

    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path)
    finished = train(cfg)
    model = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds this run's finished model"):
        train(cfg)
    assert (tmp_path / "model.safetensors").read_bytes() == model
    assert json.loads((tmp_path / "metrics.json").read_text()) == finished


def test_one_log_per_run(killed_after_last_checkpoint, tiny_model_dir, bundled_dataset_dir):
    """A resumed run keeps its log up to the checkpoint and logs each later step once; a new run
    in the same output_dir starts a new log."""
    from rmjob_trainer.train import train

    output_dir = killed_after_last_checkpoint
    resumed = train(_config(tiny_model_dir, bundled_dataset_dir, output_dir))
    assert resumed["run_name"] == "first" and _log_steps(output_dir) == list(range(1, 9))

    train(_config(tiny_model_dir, bundled_dataset_dir, output_dir, resume=False, run_name="second",
                  checkpointing_steps=None))
    assert _log_steps(output_dir) == list(range(1, 9))
