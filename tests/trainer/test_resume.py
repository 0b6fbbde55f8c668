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
    assert got.pop("settings") == want.pop("settings")
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


def test_restart_of_a_finished_run_completes_it_without_training(tiny_model_dir, bundled_dataset_dir, tmp_path,
                                                                  monkeypatch):
    """A pod evicted after metrics.json was written, during the Hub push, is replaced and reruns
    the same command: the model stays, the push and the final status are done, and it succeeds."""
    from rmjob_trainer import hub, status
    from rmjob_trainer import train as train_module

    pushed = {"repo": "me/rm", "revision": "first", "commit": "abc123", "url": "https://hub.example/me/rm"}
    pushes, reports = [], []

    def evicted_push(cfg, output_dir, metrics):
        pushes.append(metrics)
        raise KeyboardInterrupt  # SIGTERM's effect, as far as the trainer can tell

    class Reporter:
        def report(self, training, force=False):
            reports.append((training, force))

    monkeypatch.setattr(status.StatusReporter, "from_env", classmethod(lambda cls, **_: Reporter()))
    monkeypatch.setattr(hub, "push_to_hub", evicted_push)
    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path, push_to_hub=True)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg)
    first = json.loads((tmp_path / "metrics.json").read_text())
    model, log = (tmp_path / "model.safetensors").read_bytes(), (tmp_path / "log.jsonl").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("the finished run trains again")

    monkeypatch.setattr(train_module, "build_engine", no_training)
    monkeypatch.setattr(hub, "push_to_hub", lambda cfg, output_dir, metrics: pushes.append(metrics) or pushed)
    reports.clear()
    final = train_module.train(cfg)
    assert final == {**first, "hub": pushed} == json.loads((tmp_path / "metrics.json").read_text())
    assert pushes[-1]["run_name"] == "first" and "settings" not in pushes[-1]  # the model card's metrics
    assert (tmp_path / "model.safetensors").read_bytes() == model and (tmp_path / "log.jsonl").read_text() == log
    (done, force), = reports
    assert force and done["done"] and done["hub"] == pushed and done["step"] == 8
    assert done["evalAccuracy"] == first["eval/rm/accuracy"]
    # Pushed once: another restart only reports.
    assert train_module.train(cfg) == final and len(pushes) == 2


def test_finished_model_is_not_replaced_by_another_run_resuming_a_checkpoint(tiny_model_dir, bundled_dataset_dir,
                                                                            tmp_path):
    from rmjob_trainer import ConfigError
    from rmjob_trainer.train import train

    finished = train(_config(tiny_model_dir, bundled_dataset_dir, tmp_path))
    model = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"holds the finished model of another run") as error:
        train(_config(tiny_model_dir, bundled_dataset_dir, tmp_path, run_name="second"))
    assert "\n" not in str(error.value)
    assert (tmp_path / "model.safetensors").read_bytes() == model
    assert json.loads((tmp_path / "metrics.json").read_text()) == finished


class _Killed(Exception):
    pass


def _train_until(cfg, kill_after_step: int) -> None:
    """train(cfg), stopped as by a kill once step ``kill_after_step`` is logged."""
    from rmjob_trainer import train as train_module

    log = train_module.RunLog.log

    def log_then_die(self, step, *args, **kwargs):
        log(self, step, *args, **kwargs)
        if step == kill_after_step:
            raise _Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.RunLog, "log", log_then_die)
        with pytest.raises(_Killed):
            train_module.train(cfg)


def _checkpoint_learning_rates(output_dir) -> dict[str, float]:
    return {p.name: json.loads((p / "trainer_state.json").read_text())["settings"]["learning_rate"]
            for p in (output_dir / "checkpoints").iterdir()}


def test_a_new_run_removes_an_earlier_runs_checkpoints(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """Rotation keeps the highest steps: the earlier run's would outlive the new run's own, and
    a restart of the new run would find the earlier run's checkpoint."""
    from rmjob_trainer.train import train

    train(_config(tiny_model_dir, bundled_dataset_dir, tmp_path))  # checkpoints at steps 3 and 6
    second = dict(learning_rate=2e-3, run_name="second")
    _train_until(_config(tiny_model_dir, bundled_dataset_dir, tmp_path, resume=False, **second), kill_after_step=4)
    assert _checkpoint_learning_rates(tmp_path) == {"step_3": 2e-3}
    assert train(_config(tiny_model_dir, bundled_dataset_dir, tmp_path, **second))["run_name"] == "second"
    assert _log_steps(tmp_path) == list(range(1, 9))


def test_resume_with_changed_training_data_is_refused(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """Same file, same row count, other content: the checkpoint's data order would pick other
    pairs. The same content written again (new file times) still resumes."""
    import pyarrow.parquet as pq

    from rmjob_trainer import ConfigError
    from rmjob_trainer.train import train

    rows = pq.read_table(next(bundled_dataset_dir.glob("data/train-*.parquet"))).to_pylist()[:16]
    data = tmp_path / "prefs.jsonl"

    def write(swapped: bool) -> None:
        data.write_text("".join(json.dumps({"chosen": r["rejected"] if swapped else r["chosen"],
                                            "rejected": r["chosen"] if swapped else r["rejected"]}) + "\n"
                                for r in rows))

    write(swapped=False)
    cfg = _config(tiny_model_dir, data, tmp_path / "out", num_evals=0)
    _train_until(cfg, kill_after_step=7)  # after the checkpoint at step 6
    write(swapped=True)
    with pytest.raises(ConfigError, match=r"^cannot resume from .*step_6: it was trained with other settings "
                                          r"\(train_data \S+ there, \S+ now\)"):
        train(cfg)
    write(swapped=False)
    assert train(cfg)["run_name"] == "first"


def test_deepspeed_settings_that_change_the_optimization_are_recorded(tmp_path):
    from rmjob_trainer import ConfigError
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.distributed import build_deepspeed_config, deepspeed_optimization, engine_kind
    from rmjob_trainer.train import optimization_settings, resumable_state

    cfg = RewardConfig(model_name_or_path="x", dataset_mixer={"x": 1.0})
    base = dict(zero_stage=2, offload_optimizer_device="none", offload_param_device="none", zero3_init_flag=False,
                zero3_save_16bit_model=False, gradient_clipping=None)

    def settings(**changes) -> dict:
        config = build_deepspeed_config({**base, **changes}, cfg, 1, None)
        return optimization_settings(cfg, 1, 100, 100, engine_kind(config), deepspeed=deepspeed_optimization(config))

    checkpoint = tmp_path / "checkpoints/step_3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 3, "settings": settings()}))
    assert resumable_state(checkpoint, tmp_path, settings())["step"] == 3
    for change, named in [({"gradient_clipping": "1.0"}, '"gradient_clipping": 1.0'),
                          ({"offload_optimizer_device": "cpu"}, '"offload_optimizer": "cpu"')]:
        with pytest.raises(ConfigError, match=r"^cannot resume from .* other settings \(deepspeed ") as error:
            resumable_state(checkpoint, tmp_path, settings(**change))
        assert named in str(error.value)


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
