"""Margin (a per-pair ``margin`` column), reward centering (``--center_rewards_coefficient``)
and the reward normalization statistics saved with the model."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import load_dataset

from rmjob_trainer.config import RewardConfig

PAIRS = 64  # 8 optimizer steps of 8 pairs
EVAL_PAIRS = 40


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def data_files(bundled_dataset_dir, tmp_path_factory):
    """The bundled pairs as .jsonl files: without a margin column, with margins all 0, all 1."""
    root = tmp_path_factory.mktemp("margin_data")
    train = load_dataset(str(bundled_dataset_dir), split="train").select(range(PAIRS)).to_list()
    test = load_dataset(str(bundled_dataset_dir), split="test").select(range(EVAL_PAIRS)).to_list()
    files = {}
    for name, margin in (("plain", None), ("zero", 0.0), ("one", 1.0)):
        files[name] = tuple(
            _write_jsonl(root / f"{name}_{split}.jsonl",
                         [row if margin is None else {**row, "margin": margin} for row in rows])
            for split, rows in (("train", train), ("test", test)))
    return files


def _config(model_dir, files, output_dir, **overrides) -> RewardConfig:
    train_file, test_file = files
    values = dict(dataset_mixer={train_file: 1.0}, dataset_eval_mixer={test_file: 1.0},
                  model_name_or_path=str(model_dir), learning_rate=2e-3, per_device_train_batch_size=8,
                  per_device_eval_batch_size=20, num_train_epochs=1, num_evals=1, output_dir=str(output_dir),
                  run_name="margin-test", num_proc=1)
    return RewardConfig(**{**values, **overrides})


def _log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_files, tmp_path_factory):
    from rmjob_trainer.train import train

    results = {}
    for name, files, overrides in (("plain", data_files["plain"], {}), ("zero", data_files["zero"], {}),
                                   ("one", data_files["one"], {}),
                                   ("centered", data_files["plain"], {"center_rewards_coefficient": 0.1})):
        output_dir = tmp_path_factory.mktemp(f"run_{name}")
        cfg = _config(tiny_model_dir, files, output_dir, **overrides)
        results[name] = (cfg, train(cfg), _log(output_dir))
    return results


# --- the loss on hand-computed tensors ------------------------------------------------------------


def _neg_logsigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_loss_with_margin_and_centering_equals_the_formula():
    from rmjob_trainer.train import pair_losses, pair_sums

    chosen, rejected = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    margin, coefficient = torch.tensor([0.5, 0.0]), 0.1
    # -logsigmoid(r_c - r_r - m) per pair: -logsigmoid(0.5), -logsigmoid(-0.5)
    bradley_terry = (_neg_logsigmoid(1.0 - 0.0 - 0.5) + _neg_logsigmoid(0.5 - 1.0 - 0.0)) / 2
    centering = coefficient * ((1.0 + 0.0) ** 2 + (0.5 + 1.0) ** 2) / 2
    assert pair_losses(chosen, rejected, margin, coefficient).mean().item() == pytest.approx(
        bradley_terry + centering, abs=1e-6)
    assert pair_losses(chosen, rejected, margin).mean().item() == pytest.approx(bradley_terry, abs=1e-6)
    assert pair_losses(chosen, rejected).mean().item() == pytest.approx(
        (_neg_logsigmoid(1.0) + _neg_logsigmoid(-0.5)) / 2, abs=1e-6)
    sums = pair_sums(chosen, rejected, None, margin, coefficient)
    # the logged loss is the optimized one; the logged reward margin stays r_chosen - r_rejected
    assert sums[2].item() / sums[0].item() == pytest.approx(bradley_terry + centering, abs=1e-6)
    assert sums[5].item() == pytest.approx((1.0 - 0.0) + (0.5 - 1.0), abs=1e-6)


# --- the training loop --------------------------------------------------------------------------


def test_margins_all_zero_train_exactly_like_no_margin_column(runs):
    _, _, plain = runs["plain"]
    _, _, zero = runs["zero"]
    assert len(plain) == PAIRS // 8
    assert zero == plain


def test_margins_enter_the_training_loss(runs):
    _, _, plain = runs["plain"]
    _, _, one = runs["one"]
    # Same model, same first batch: the rewards agree, the loss is that of r_c - r_r - 1.
    first, first_plain = one[0], plain[0]
    assert first["train/rm/chosen_reward"] == pytest.approx(first_plain["train/rm/chosen_reward"], abs=1e-6)
    assert first["train/rm/loss"] > first_plain["train/rm/loss"] + 0.1
    assert one[1:] != plain[1:]


def test_centering_adds_its_term_to_the_training_loss(runs):
    _, _, plain = runs["plain"]
    cfg, _, centered = runs["centered"]
    first, first_plain = centered[0], plain[0]
    assert first["train/rm/chosen_reward"] == pytest.approx(first_plain["train/rm/chosen_reward"], abs=1e-6)
    assert first["train/rm/rejected_reward"] == pytest.approx(first_plain["train/rm/rejected_reward"], abs=1e-6)
    # mean((c + r)^2) >= (mean(c) + mean(r))^2 (Jensen), with equality only for constant sums
    floor = cfg.center_rewards_coefficient * (first["train/rm/chosen_reward"] + first["train/rm/rejected_reward"]) ** 2
    added = first["train/rm/loss"] - first_plain["train/rm/loss"]
    assert added > 0 and added >= floor - 1e-6


def test_center_rewards_coefficient_is_a_resume_setting():
    from rmjob_trainer.train import optimization_settings

    settings = optimization_settings(RewardConfig(center_rewards_coefficient=0.01, dataset_mixer={"x": 1}),
                                     1, 10, 10, "ddp")
    assert settings["center_rewards_coefficient"] == 0.01


# --- normalization statistics ---------------------------------------------------------------------


def _recomputed_stats(output_dir, dataset) -> tuple[float, float]:
    """Mean and population std of every chosen and rejected reward of ``dataset`` under the
    saved model, through plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.model import get_reward

    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    rewards = []
    for sequence in list(dataset["input_ids_chosen"]) + list(dataset["input_ids_rejected"]):
        with torch.no_grad():
            rewards.append(get_reward(model, torch.tensor([sequence]), tokenizer.pad_token_id).item())
    mean = sum(rewards) / len(rewards)
    return mean, math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))


def _saved_stats(output_dir, metrics: dict, split: str) -> tuple[float, float]:
    config = json.loads((output_dir / "config.json").read_text())
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert config["reward_normalization_dataset"] == split
    for record in (saved, metrics):
        assert record["reward_mean"] == config["reward_mean"] and record["reward_std"] == config["reward_std"]
    return config["reward_mean"], config["reward_std"]


def test_saved_reward_stats_are_those_of_the_saved_model_on_the_eval_set(runs):
    from transformers import AutoTokenizer

    from rmjob_trainer.data import build_datasets

    cfg, metrics, log = runs["plain"]
    output_dir = Path(cfg.output_dir)
    mean, std = _saved_stats(output_dir, metrics, "eval")
    assert (log[-1]["eval/rm/reward_mean"], log[-1]["eval/rm/reward_std"]) == (mean, std)
    _, eval_dataset = build_datasets(cfg, AutoTokenizer.from_pretrained(output_dir))
    assert len(eval_dataset) == EVAL_PAIRS
    recomputed_mean, recomputed_std = _recomputed_stats(output_dir, eval_dataset)
    assert std > 0.01
    assert mean == pytest.approx(recomputed_mean, abs=1e-4)
    assert std == pytest.approx(recomputed_std, abs=1e-4)


def test_saved_reward_stats_fall_back_to_the_training_set(tiny_model_dir, data_files, tmp_path):
    from transformers import AutoTokenizer

    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.train import train

    cfg = _config(tiny_model_dir, data_files["plain"], tmp_path, num_evals=0, dataset_eval_mixer=None)
    metrics = train(cfg)
    assert not any(key.startswith("eval/") for key in metrics)
    mean, std = _saved_stats(tmp_path, metrics, "train")
    train_dataset, _ = build_datasets(cfg, AutoTokenizer.from_pretrained(tmp_path))
    recomputed_mean, recomputed_std = _recomputed_stats(tmp_path, train_dataset)
    assert mean == pytest.approx(recomputed_mean, abs=1e-4)
    assert std == pytest.approx(recomputed_std, abs=1e-4)
