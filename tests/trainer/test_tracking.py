"""rmjob_trainer.tracking with W&B in offline mode, checked by reading the run's .wandb file.

wandb 0.31 has no public reader for offline runs (the old ``wandb.sdk.internal.datastore``
is gone), so :func:`read_run` decodes the file directly: a LevelDB-style log of
``wandb.proto`` ``Record`` messages after a 7-byte ``:W&B`` header.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import pytest

from rmjob_trainer.config import RewardConfig
from rmjob_trainer.tracking import start_run

_BLOCK = 32768
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type
_FULL, _LAST = 1, 4


@dataclass
class OfflineRun:
    name: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per step, values JSON-decoded
    summary: dict = field(default_factory=dict)


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = 7, []
    while pos + _RECORD_HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER.size:  # block trailer padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        pos += _RECORD_HEADER.size
        if pos + length > len(data):  # still being written
            return
        chunks.append(data[pos:pos + length])
        pos += length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _complete_records(path: Path, timeout: float = 30.0) -> list:
    """The run's records once its ``exit`` record is written: ``run.finish()`` can return
    before wandb's background service has flushed the file."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout}s"
        time.sleep(0.1)


def read_run(wandb_dir: Path) -> OfflineRun:
    """The single offline run under ``wandb_dir``, as the W&B server would see it."""
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    run = OfflineRun()
    for record in _complete_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # sent again, sometimes partially, when notes or config change: upsert
            run.name = record.run.display_name or run.name
            run.notes = record.run.notes or run.notes
            run.tags = list(record.run.tags) or run.tags
            run.config |= {_key(i): json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            run.config |= {_key(i): json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
    return run


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, writing under tmp_path. wandb reads its environment once per process
    (``wandb.setup``), so the fixture tears that down for the next test to see its own."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def _cfg(**overrides) -> RewardConfig:
    fields = dict(model_name_or_path="EleutherAI/pythia-14m", dataset_mixer={"d": 1.0}, with_tracking=True,
                  exp_name="rm_test", wandb_project_name="rmjob-tests")
    return RewardConfig(**(fields | overrides))


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 4), (200, 30, 30)).save(path)
    return path


def test_offline_run_records_metrics_table_image_and_hub_link(offline_wandb):
    cfg = _cfg(learning_rate=3e-6)
    tracker = start_run(cfg, "rm_test__1__1725461002")
    assert tracker.url is None  # offline runs have no page
    for step in (1, 2):
        tracker.log({"train/rm/loss": 0.7 / step, "train/rm/accuracy": 0.5, "train/rm/lr": 3e-6,
                     "episode": 32 * step, "epoch": 0.25 * step}, step=step)
    tracker.log({"eval/rm/accuracy": 0.75, "eval/rm/reward_margin": 0.4}, step=2)
    tracker.log_table("preference_sample_texts", ["chosen", "rejected", "reward_margin"],
                      [["good", "bad", 1.5], ["fine", "worse", 0.2]])
    tracker.log_image("token_length_visualization", str(_png(offline_wandb / "lengths.png")))
    tracker.link_hub("https://huggingface.co/org/rm/tree/rm_test__1__1725461002")
    tracker.finish()

    run = read_run(offline_wandb)
    assert run.name == "rm_test__1__1725461002"
    assert run.tags == ["rm_test"]
    assert run.config["learning_rate"] == 3e-6 and run.config["exp_name"] == "rm_test"
    assert run.config["hf_repo_url"] == "https://huggingface.co/org/rm/tree/rm_test__1__1725461002"
    assert run.summary["hf_repo_url"] == run.config["hf_repo_url"]
    assert run.config["hf_repo_url"] in run.notes
    assert [h["_step"] for h in run.history] == [1, 2]  # the table and image joined step 2
    assert run.history[0]["train/rm/loss"] == pytest.approx(0.7) and run.history[0]["episode"] == 32
    last = run.history[-1]
    assert last["eval/rm/accuracy"] == 0.75 and last["train/rm/loss"] == pytest.approx(0.35)
    assert last["preference_sample_texts/_type"] == "table-file"
    assert last["preference_sample_texts/nrows"] == 2
    assert last["token_length_visualization/_type"] == "image-file"
    table = next(offline_wandb.glob("wandb/offline-run-*/files/media/table/preference_sample_texts_*.table.json"))
    assert json.loads(table.read_text())["data"] == [["good", "bad", 1.5], ["fine", "worse", 0.2]]


def test_tracking_off_is_a_no_op(offline_wandb):
    tracker = start_run(_cfg(with_tracking=False), "run")
    tracker.log({"train/rm/loss": 1.0}, step=1)
    tracker.log_table("t", ["a"], [[1]])
    tracker.log_image("i", "does-not-exist.png")
    tracker.link_hub("https://huggingface.co/x")
    tracker.finish()
    assert tracker.url is None
    assert not (offline_wandb / "wandb").exists()


def test_cli_with_tracking_logs_the_run(offline_wandb, tmp_path, tiny_model_dir, bundled_dataset_dir):
    """``python -m rmjob_trainer --with_tracking`` end to end, W&B offline."""
    data = str(bundled_dataset_dir)
    command = [
        sys.executable, "-m", "rmjob_trainer", "--model_name_or_path", str(tiny_model_dir),
        "--dataset_mixer", json.dumps({data: 32}), "--dataset_eval_mixer", json.dumps({data: 16}),
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--output_dir", str(tmp_path / "out"), "--exp_name", "rm_cli", "--with_tracking",
    ]
    api_key = "0123456789abcdef" * 2 + "deadbeef"  # W&B keys are 40 characters
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_API_KEY": api_key})
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    run = read_run(offline_wandb)
    assert api_key not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):  # the output dir and every W&B file
        assert not path.is_file() or api_key.encode() not in path.read_bytes(), path
    assert run.name == metrics["run_name"] and run.tags == ["rm_cli"]
    assert run.config["with_tracking"] is True and run.config["exp_name"] == "rm_cli"
    logged = {key: value for row in run.history for key, value in row.items()}
    assert {"episode", "epoch", "train/rm/loss", "train/rm/accuracy", "train/rm/lr", "eval/rm/accuracy"} <= set(logged)
    eval_row = next(row for row in run.history if "eval/rm/accuracy" in row)
    assert eval_row["preference_sample_texts/_type"] == "table-file"  # the samples share the eval's step
    assert any("token_length" in key and value == "image-file"
               for key, value in logged.items() if key.endswith("/_type")), sorted(logged)
    assert run.history[-1]["eval/rm/accuracy"] == pytest.approx(metrics["eval/rm/accuracy"])


OPEN_RUN_AT_EXIT = """
import rmjob_trainer.cli as cli
from rmjob_trainer.preemption import Preempted
from rmjob_trainer.tracking import start_run
from rmjob_trainer.config import RewardConfig

def preempted_training():
    tracker = start_run(RewardConfig(model_name_or_path="m", with_tracking=True), "open_at_exit")
    for step in range(1, 4):
        tracker.log({"train/rm/loss": 1.0 / step}, step=step)
    raise Preempted(3)  # a path that leaves without finishing the run

cli.main = preempted_training
cli.run()
"""


def test_a_run_left_open_reaches_its_files_when_the_process_leaves(offline_wandb, tmp_path):
    """The process entry skips the interpreter's teardown (cli.run), whose atexit hooks would
    have finished the W&B run and removed W&B's temporary folders."""
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([sys.executable, "-c", OPEN_RUN_AT_EXIT], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode == 200, result.stderr[-3000:]
    run = read_run(offline_wandb)
    assert [row["train/rm/loss"] for row in run.history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_preempted_run_finishes_its_w_and_b_run_as_preempted(offline_wandb, tiny_model_dir, bundled_dataset_dir,
                                                                tmp_path, monkeypatch):
    """Its steps so far are in the W&B run, which ends with the exit status the pod ends with."""
    import signal

    from test_preemption import _sigterm_during_step
    from test_resume import _config

    from rmjob_trainer import train as train_module
    from rmjob_trainer.preemption import EXIT_PREEMPTED, Preempted

    action = signal.getsignal(signal.SIGTERM)
    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path / "out", num_evals=2, checkpointing_steps=None)
    monkeypatch.setattr(train_module.DataOrder, "micro_batch", _sigterm_during_step(3))
    try:
        with pytest.raises(Preempted):
            train_module.train(dataclasses_replace(cfg, with_tracking=True))
    finally:
        signal.signal(signal.SIGTERM, action)
    (path,) = offline_wandb.glob("wandb/offline-run-*/run-*.wandb")
    records = _complete_records(path, timeout=5)
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [EXIT_PREEMPTED]
    assert len(read_run(offline_wandb).history) == 3
