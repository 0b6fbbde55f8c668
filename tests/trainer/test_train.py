"""Single-process training: it learns, logs open-instruct's metrics, saves a loadable model."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmjob_trainer.config import RewardConfig

STEPS_PER_EPOCH = 25  # 200 pairs / 8


def _config(model_dir, dataset_dir, output_dir, **overrides) -> RewardConfig:
    values = dict(
        dataset_mixer={str(dataset_dir): 1.0},
        model_name_or_path=str(model_dir),
        sanity_check=True,
        sanity_check_max_samples=200,
        learning_rate=2e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=50,
        num_train_epochs=2,
        num_evals=2,
        output_dir=str(output_dir),
        run_name="test-run",
    )
    return RewardConfig(**{**values, **overrides})


class RecordingReporter:
    def __init__(self):
        self.reports = []

    def report(self, training, force=False):
        self.reports.append((training, force))


def _train_recording_status(cfg: RewardConfig) -> dict:
    from rmjob_trainer import status
    from rmjob_trainer.train import train

    reporter = RecordingReporter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(status.StatusReporter, "from_env", classmethod(lambda cls, **_: reporter))
        metrics = train(cfg)
    return {"cfg": dataclasses.asdict(cfg), "metrics": metrics, "reports": reporter.reports}


@pytest.fixture(scope="session")
def trained(tiny_model_dir, bundled_dataset_dir, tmp_path_factory, worker_id):
    """One 2-epoch run shared by the tests below, run once even across xdist workers
    (xdist's recipe: a directory the workers share, guarded by a file lock)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    record = root / "trained" / "run.json"
    with FileLock(str(root / "trained.lock")):
        if not record.exists():
            cfg = _config(tiny_model_dir, bundled_dataset_dir, root / "trained")
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps(_train_recording_status(cfg)))
    run = json.loads(record.read_text())
    cfg = RewardConfig(**run["cfg"])
    log = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "log.jsonl"))]
    return cfg, run["metrics"], log, run["reports"]


def test_learns_the_bundled_data(trained):
    _, metrics, _, _ = trained
    assert metrics["eval/rm/accuracy"] >= 0.9
    assert metrics["eval/rm/loss"] < 0.4


def test_logs_open_instruct_metric_names_every_optimizer_step(trained):
    _, metrics, log, _ = trained
    train_keys = {"episode", "epoch", "train/rm/accuracy", "train/rm/loss", "train/rm/chosen_reward",
                  "train/rm/rejected_reward", "train/rm/reward_margin", "train/rm/lr"}
    eval_keys = {"eval/rm/accuracy", "eval/rm/loss", "eval/rm/chosen_rewards", "eval/rm/rejected_rewards",
                 "eval/rm/reward_margin"}
    assert [row["step"] for row in log] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert all(train_keys <= row.keys() for row in log)
    assert [row["step"] for row in log if eval_keys <= row.keys()] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert log[-1]["episode"] == 400 and log[-1]["epoch"] == 2.0
    assert metrics["run_name"] == "test-run" and metrics["step"] == 2 * STEPS_PER_EPOCH
    for key in (*train_keys, *eval_keys):
        assert metrics[key] == log[-1][key]
    assert metrics["eval/rm/reward_margin"] == pytest.approx(
        metrics["eval/rm/chosen_rewards"] - metrics["eval/rm/rejected_rewards"], abs=1e-4)


def test_lr_decays_to_zero_exactly_at_the_last_step_of_a_two_epoch_run(trained):
    # open-instruct's horizon was steps x epochs: this run would have ended at half the LR.
    cfg, _, log, _ = trained
    lrs = [row["train/rm/lr"] for row in log]
    total = len(lrs)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[-2] == pytest.approx(cfg.learning_rate / total)
    assert lrs[total // 2 - 1] == pytest.approx(cfg.learning_rate / 2)


def test_output_dir_holds_a_plain_loadable_model_that_reproduces_eval_accuracy(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.chat_templates import CHAT_TEMPLATES
    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.model import get_reward

    cfg, metrics, _, _ = trained
    files = set(os.listdir(cfg.output_dir))
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "metrics.json"} <= files
    assert not [f for f in files if f.endswith(".bin")]
    assert json.load(open(os.path.join(cfg.output_dir, "metrics.json"))) == metrics

    model = AutoModelForSequenceClassification.from_pretrained(cfg.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.output_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATES[cfg.chat_template]
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    _, eval_dataset = build_datasets(cfg, tokenizer)
    correct = 0
    for start in range(0, len(eval_dataset), cfg.per_device_eval_batch_size):  # the trainer's batches
        rows = eval_dataset[start:start + cfg.per_device_eval_batch_size]
        sequences = rows["input_ids_chosen"] + rows["input_ids_rejected"]
        longest = max(map(len, sequences))
        batch = torch.tensor([s + [tokenizer.pad_token_id] * (longest - len(s)) for s in sequences])
        with torch.no_grad():
            chosen, rejected = get_reward(model, batch, tokenizer.pad_token_id).chunk(2)
        correct += (chosen > rejected).sum().item()
    assert correct / len(eval_dataset) == pytest.approx(metrics["eval/rm/accuracy"], abs=1e-9)


def test_status_reported_each_step_then_done(trained):
    _, metrics, log, reports = trained
    assert len(reports) == len(log) + 1
    first, force = reports[0]
    assert not force and first["step"] == 1 and first["totalSteps"] == len(log) and "evalLoss" not in first
    final, force = reports[-1]
    assert force and final["done"] is True
    assert final["step"] == len(log) and final["episode"] == metrics["episode"]
    assert final["trainLoss"] == metrics["train/rm/loss"]
    assert final["evalAccuracy"] == metrics["eval/rm/accuracy"]
    assert final["evalRewardMargin"] == metrics["eval/rm/reward_margin"]


def test_reward_is_read_at_the_last_non_pad_token(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from rmjob_trainer.model import get_reward

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    pad = 999
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    padded = torch.tensor([s + [pad] * (5 - len(s)) for s in sequences])
    with torch.no_grad():
        batched = get_reward(model, padded, pad)
        alone = torch.cat([get_reward(model, torch.tensor([s]), pad) for s in sequences])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_score_head_init_and_dropout_disabled(tiny_model_dir):
    from transformers import AutoTokenizer

    from rmjob_trainer.model import load_model

    cfg = RewardConfig(model_name_or_path=str(tiny_model_dir))
    torch.manual_seed(0)
    model = load_model(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    std = 1 / math.sqrt(model.config.hidden_size + 1)
    assert model.score.weight.std().item() == pytest.approx(std, rel=0.2)
    assert all(getattr(model.config, k) == 0 for k in model.config.to_dict() if "dropout" in k)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_llama_tokenizer_without_pad_token_trains(tiny_llama_no_pad_dir, bundled_dataset_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.model import PAD_TOKEN
    from rmjob_trainer.train import train

    cfg = _config(tiny_llama_no_pad_dir, bundled_dataset_dir, tmp_path, sanity_check_max_samples=16,
                  num_train_epochs=1, num_evals=1, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    metrics = train(cfg)
    assert metrics["step"] == 2 and math.isfinite(metrics["eval/rm/loss"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    embeddings = model.get_input_embeddings().num_embeddings
    assert embeddings >= len(tokenizer) and embeddings % 8 == 0


def test_seed_level0_command_runs(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """The seed doc's Level 0 debug command, with a local model and dataset and no push."""
    dataset = json.dumps({str(bundled_dataset_dir): 1.0})
    argv = [
        "--dataset_mixer", dataset, "--dataset_train_splits", "train",
        "--dataset_mixer", dataset, "--dataset_eval_splits", "test",
        "--model_name_or_path", str(tiny_model_dir), "--chat_template", "simple_concat_with_space",
        "--learning_rate", "3e-6", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
        "--gradient_accumulation_steps", "32", "--max_token_length", "1024", "--max_prompt_token_length", "1024",
        "--num_train_epochs", "1", "--output_dir", str(tmp_path / "models/rm/rm"), "--sanity_check",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rmjob_trainer", *argv], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(tmp_path / "models/rm/rm/metrics.json"))
    assert metrics["step"] == 100 // 32 and metrics["episode"] == 96
    assert metrics["run_name"].startswith("reward_modeling__1__")
    assert 0 <= metrics["eval/rm/accuracy"] <= 1


def test_tracking_and_hub_push_are_wired(tiny_model_dir, bundled_dataset_dir, tmp_path, monkeypatch):
    from rmjob_trainer import hub, tracking
    from rmjob_trainer.train import train

    calls = []

    class FakeTracker:
        url = "https://wandb.example/run"

        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args, kwargs))

    pushed = {"repo": "me/rm", "revision": "test-run", "commit": "abc123", "url": "https://hub.example/me/rm"}

    def fake_push(cfg, output_dir, metrics):
        assert (Path(output_dir) / "model.safetensors").exists()  # pushed after saving
        return pushed

    monkeypatch.setattr(tracking, "start_run", lambda cfg, run_name: FakeTracker())
    monkeypatch.setattr(hub, "push_to_hub", fake_push)
    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path, sanity_check_max_samples=16, num_train_epochs=1,
                  num_evals=1, with_tracking=True, push_to_hub=True)
    metrics = train(cfg)
    assert metrics["hub"] == pushed
    assert json.load(open(tmp_path / "metrics.json"))["hub"] == pushed
    names = [name for name, _, _ in calls]
    assert names.count("log") == metrics["step"]
    assert ("log_image", ("token_length_visualization", str(tmp_path / "token_length.png")), {}) in calls
    (_, (key, columns, rows), _), = [c for c in calls if c[0] == "log_table"]
    assert key == "preference_sample_texts" and len(rows) == 10 and len(rows[0]) == len(columns) == 4
    assert ("link_hub", (pushed["url"],), {}) in calls and names[-1] == "finish"
