"""The reward-model training loop: Bradley-Terry loss, ``-logsigmoid(r_chosen - r_rejected)``
(minus a per-pair ``margin`` when the data has one, plus TRL's reward-centering term with
``--center_rewards_coefficient``).

Semantics follow open-instruct's ``reward_modeling.py`` (batch sizes, run name, episodes,
metric names, evaluation, samples table), with three fixes: the LR schedule's horizon is the
run's true number of optimizer steps; evaluation covers the whole eval set across all ranks,
each pair counted once; and the run is resumable from periodic checkpoints.

Data order is a pure function of (seed, step): the training stream is the concatenation of
one seeded permutation of the dataset per epoch, optimizer step ``s`` consumes stream
positions ``[s * batch_size, (s + 1) * batch_size)``, and micro-step ``m`` of rank ``r`` takes
slice ``m * world_size + r`` of it. Resuming therefore needs only the step, and a run on N
processes sees the same pairs per optimizer step as one process with N times the accumulation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from tqdm.auto import tqdm

from rmjob_trainer import ConfigError, DataError
from rmjob_trainer.config import RewardConfig
from rmjob_trainer.distributed import (Dist, all_reduce_sum, barrier, broadcast_object, build_deepspeed_config,
                                       build_engine, deepspeed_optimization, deepspeed_settings, engine_kind,
                                       init_distributed, leave_distributed, main_process_first, resolve_precision)
from rmjob_trainer.evaluate import (benchmark_metrics, evaluate_benchmark, load_benchmark, log_to_wandb,
                                    summary_line, write_report)
from rmjob_trainer.model import load_tokenizer, padded_batch
from rmjob_trainer.preemption import EXIT_PREEMPTED, Preempted, SigtermWatch

CHOSEN, REJECTED = "input_ids_chosen", "input_ids_rejected"
TRAIN_NAMES = ("accuracy", "loss", "chosen_reward", "rejected_reward", "reward_margin")
EVAL_NAMES = ("accuracy", "loss", "chosen_rewards", "rejected_rewards", "reward_margin")
NUM_SAMPLE_ROWS = 10
BENCHMARK_PREFIX = "benchmark/"
# The final status report (done, Hub revision) may wait this long for the API server at the end:
# one report's retries (rmjob_trainer.status) fit in it.
FINAL_REPORT_TIMEOUT_S = 30


# --- data -----------------------------------------------------------------------------------
class DataOrder:
    """Which training rows each rank uses at each step (see the module docstring)."""

    def __init__(self, dataset_size: int, seed: int, batch_size: int, world_size: int, micro_batch_size: int):
        self.dataset_size, self.seed = dataset_size, seed
        self.batch_size, self.world_size, self.micro_batch_size = batch_size, world_size, micro_batch_size
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutations = {epoch: torch.randperm(self.dataset_size, generator=generator).tolist()}
        return self._permutations[epoch]

    def micro_batch(self, step: int, micro_step: int, rank: int) -> list[int]:
        start = step * self.batch_size + (micro_step * self.world_size + rank) * self.micro_batch_size
        positions = (divmod(p, self.dataset_size) for p in range(start, start + self.micro_batch_size))
        return [self._permutation(epoch)[i] for epoch, i in positions]

    def state(self, step: int) -> dict:
        """Where the stream stands before ``step`` (saved in checkpoints, checked on resume)."""
        epoch, position = divmod(step * self.batch_size, self.dataset_size)
        return {"seed": self.seed, "dataset_size": self.dataset_size, "epoch": epoch, "position": position}


def collate(dataset, indices: list[int], pad_token_id: int, padding_free: bool, device,
            prefix_sharing: bool = False) -> dict:
    """Chosen then rejected sequences of ``indices``, for one forward pass."""
    rows = dataset[indices]
    sequences = rows[CHOSEN] + rows[REJECTED]
    if padding_free and prefix_sharing:
        from rmjob_trainer.prefix_sharing import collate_shared

        batch = collate_shared(rows[CHOSEN], rows[REJECTED])
    elif padding_free:
        from rmjob_trainer.packing import collate_packed

        batch = collate_packed(sequences)
    else:
        batch = padded_batch(sequences, pad_token_id)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --- metrics --------------------------------------------------------------------------------
def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Each pair's loss, as TRL's RewardTrainer computes it: ``-logsigmoid(r_chosen - r_rejected
    - margin)``, plus ``coefficient * (r_chosen + r_rejected)^2`` with centering (its batch
    mean is TRL's ``coefficient * mean((r_chosen + r_rejected)^2)``)."""
    difference = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


NUM_SUMS = 7


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor | None = None,
              margin: torch.Tensor | None = None, center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """[pairs, accuracy, loss, chosen, rejected, margin, chosen^2 + rejected^2], summed over pairs
    (all-reducible). ``margin`` is the pair's required margin; the sixth column stays the reward
    margin ``chosen - rejected`` (open-instruct's ``reward_margin``)."""
    weight = torch.ones_like(chosen) if weight is None else weight
    difference = chosen - rejected
    per_pair = torch.stack([torch.ones_like(difference), (difference > 0).float(),
                            pair_losses(chosen, rejected, margin, center_rewards_coefficient),
                            chosen, rejected, difference, chosen ** 2 + rejected ** 2])
    return (per_pair * weight).sum(1)


def named_means(sums: torch.Tensor, prefix: str, names: tuple[str, ...]) -> dict[str, float]:
    """Means of ``pair_sums`` columns already summed over all ranks."""
    sums = sums.tolist()
    return {f"{prefix}{name}": value / sums[0] for name, value in zip(names, sums[1:])}


def reward_stats(sums: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of all 2N rewards, chosen and rejected, from
    ``pair_sums`` summed over all ranks: what a PPO/GRPO consumer normalizes rewards with."""
    pairs, _, _, chosen, rejected, _, squares = sums.double().tolist()
    mean = (chosen + rejected) / (2 * pairs)
    return mean, math.sqrt(max(squares / (2 * pairs) - mean ** 2, 0.0))


def margins_of(dataset) -> torch.Tensor | None:
    """The dataset's ``margin`` column (None without one)."""
    from rmjob_trainer.data import MARGIN_KEY

    if MARGIN_KEY not in dataset.column_names:
        return None
    return torch.tensor(dataset[MARGIN_KEY], dtype=torch.float32)


@torch.no_grad()
def score(engine, dataset, tokenizer, cfg: RewardConfig, d: Dist) -> tuple[torch.Tensor, list[list]]:
    """``pair_sums`` over the whole dataset (all ranks, summed over them), and sample rows
    (rank 0's first pairs)."""
    engine.train(False)
    margins = margins_of(dataset)
    sums, rows = torch.zeros(NUM_SUMS, device=d.device), []
    for chunk, weight in eval_shard(len(dataset), d.rank, d.world_size, cfg.per_device_eval_batch_size):
        chosen, rejected = engine.forward(collate(dataset, chunk, tokenizer.pad_token_id, cfg.padding_free,
                                                  d.device, cfg.prefix_sharing)).chunk(2)
        margin = None if margins is None else margins[chunk].to(d.device)
        sums += pair_sums(chosen, rejected, torch.tensor(weight, device=d.device), margin,
                          cfg.center_rewards_coefficient)
        if d.is_main and len(rows) < NUM_SAMPLE_ROWS:
            pairs = dataset[chunk]
            rows += [[tokenizer.decode(c, skip_special_tokens=True), tokenizer.decode(r, skip_special_tokens=True),
                      cr, rr] for c, r, cr, rr in zip(pairs[CHOSEN], pairs[REJECTED], chosen.tolist(), rejected.tolist())]
    engine.train(True)
    return all_reduce_sum(sums), rows[:NUM_SAMPLE_ROWS]


def eval_shard(size: int, rank: int, world_size: int, batch_size: int) -> list[tuple[list[int], list[float]]]:
    """Rank ``rank``'s eval batches as (indices, weights).

    Rank r scores pairs r, r + world_size, ...: every pair exactly once. Ranks with fewer pairs
    pad with weight-0 repeats of pair 0, since every rank must run the same number of forward
    passes (DDP syncs buffers and ZeRO-3 gathers weights inside forward)."""
    per_rank = math.ceil(size / world_size)
    indices = list(range(rank, size, world_size))
    indices += [-1] * (per_rank - len(indices))
    return [([max(i, 0) for i in chunk], [float(i >= 0) for i in chunk])
            for chunk in (indices[start:start + batch_size] for start in range(0, per_rank, batch_size))]


def evaluate(engine, dataset, tokenizer, cfg: RewardConfig, d: Dist) -> tuple[dict, list[list]]:
    """Eval metrics over the whole eval set (all ranks), and sample rows (rank 0's first pairs)."""
    sums, rows = score(engine, dataset, tokenizer, cfg, d)
    mean, std = reward_stats(sums)
    return {**named_means(sums, "eval/rm/", EVAL_NAMES), "eval/rm/reward_mean": mean,
            "eval/rm/reward_std": std}, rows


def normalization_stats(engine, train_dataset, tokenizer, cfg: RewardConfig, d: Dist, final: dict) -> dict:
    """The final model's reward mean and std on the eval set (its last evaluation), or on the
    training set when there is no eval set, and which set that was."""
    if "eval/rm/reward_mean" in final:
        return {"reward_mean": final["eval/rm/reward_mean"], "reward_std": final["eval/rm/reward_std"],
                "reward_normalization_dataset": "eval"}
    mean, std = reward_stats(score(engine, train_dataset, tokenizer, cfg, d)[0])
    return {"reward_mean": mean, "reward_std": std, "reward_normalization_dataset": "train"}


def load_eval_benchmark(path: str):
    """``--eval_benchmark``, read before any training so that a bad file stops the run at once."""
    try:
        return load_benchmark(path)
    except DataError as e:
        raise DataError(f"--eval_benchmark: {str(e).removeprefix('--dataset: ')}") from None


def score_benchmark(engine, tokenizer, benchmark, cfg: RewardConfig, d: Dist) -> dict:
    """``--eval_benchmark`` (loaded as ``benchmark``) on the model being trained. Every rank
    scores it: under ZeRO-3 each forward pass gathers weights from all ranks."""
    engine.train(False)
    result = evaluate_benchmark(engine.hf_model, tokenizer, benchmark,
                                batch_size=cfg.per_device_eval_batch_size, device=d.device)
    engine.train(True)
    return result


def print_samples(rows: list[list]) -> None:
    print("preference samples (chosen_reward, rejected_reward, chosen | rejected):")
    for chosen, rejected, chosen_reward, rejected_reward in rows:
        print(f"  {chosen_reward:+.3f} {rejected_reward:+.3f}  {chosen[-60:]!r} | {rejected[-60:]!r}")


# --- checkpoints ----------------------------------------------------------------------------
def latest_checkpoint(output_dir: Path) -> Path | None:
    """Newest complete checkpoint: ``step_N`` directories only appear by atomic rename."""
    steps = sorted(output_dir.glob("checkpoints/step_*"), key=lambda p: int(p.name.split("_")[1]))
    return steps[-1] if steps else None


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, output_dir: Path, step: int, trainer_state: dict, d: Dist, keep: int) -> None:
    """Written to a temporary directory and renamed, so a killed run leaves no half checkpoint."""
    root = output_dir / "checkpoints"
    tmp, final = root / f".tmp-step_{step}", root / f"step_{step}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
            shutil.rmtree(old)
    barrier()


# The flags that decide a run's optimization: the model, the training rows and their tokens, the
# batches, the optimizer and its schedule (optimization_settings adds the values derived from them).
_OPTIMIZATION_FLAGS = ("model_name_or_path", "model_revision", "dataset_mixer", "dataset_train_splits",
                       "chat_template", "max_token_length", "max_prompt_token_length", "seed",
                       "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                       "lr_scheduler_type", "warm_up_steps", "eps", "weight_decay", "mixed_precision",
                       "center_rewards_coefficient")


# LoRA decides which weights are trained and the shape of the checkpointed model.
_LORA_FLAGS = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def optimization_settings(cfg: RewardConfig, world_size: int, train_pairs: int, total_episodes: int,
                          engine: str, *, deepspeed: dict | None = None, train_data: str | None = None) -> dict:
    """Recorded in every checkpoint and in metrics.json; a run resumes from a checkpoint only with
    the same values, or it would continue another run's optimizer state, schedule and data order.
    ``deepspeed``: :func:`deepspeed_optimization` of the run's DeepSpeed config; ``train_data``:
    :func:`data_hash` of the training set. JSON values, as they are stored."""
    flags = _OPTIMIZATION_FLAGS + _LORA_FLAGS
    settings = {**{flag: getattr(cfg, flag) for flag in flags}, "total_episodes": total_episodes,
                "processes": world_size, "train_pairs": train_pairs, "engine": engine, "deepspeed": deepspeed,
                "train_data": train_data}
    return json.loads(json.dumps(settings))


def data_hash(dataset) -> str:
    """Hash of the training pairs' token ids and margins, in row order: the rows a checkpoint's
    data order refers to. Content, not file names or times, so data fetched again when a pod
    restarts still resumes, and data changed under the same name and row count does not."""
    from rmjob_trainer.data import MARGIN_KEY

    digest = xxhash.xxh3_128()  # datasets' own hash: GB/s, where hashlib's are ten times slower
    columns = [column for column in (CHOSEN, REJECTED, MARGIN_KEY) if column in dataset.column_names]
    for table in dataset.with_format("arrow", columns=columns).iter(batch_size=10_000):
        for column in columns:
            array = table.column(column).combine_chunks()
            if array.type.num_fields:  # token-id lists: their lengths, then their tokens
                digest.update(array.value_lengths().to_numpy(zero_copy_only=False).tobytes())
                array = array.flatten()
            digest.update(array.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def resumable_state(checkpoint: Path, output_dir: Path, settings: dict) -> dict:
    """The checkpoint's trainer state, when this run may continue from it; else a ConfigError
    naming what differs. A finished model in ``output_dir`` is never overwritten by a run
    continued from an older checkpoint."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("settings")
    if saved is None:
        raise ConfigError(f"cannot resume from {checkpoint}: it does not record the settings it was trained "
                          "with (written by an older rmjob); use another --output_dir or --resume false")
    differences = [f"{key} {json.dumps(saved.get(key))} there, {json.dumps(value)} now"
                   for key, value in settings.items() if saved.get(key) != value]
    if differences:
        raise ConfigError(f"cannot resume from {checkpoint}: it was trained with other settings "
                          f"({'; '.join(differences)}); rerun with its settings, use another --output_dir, "
                          "or --resume false")
    if (output_dir / "metrics.json").exists():
        raise ConfigError(f"{output_dir} holds the finished model of another run (its metrics.json records other "
                          f"settings or run name); resuming from {checkpoint} would replace it: use another "
                          "--output_dir, or --resume false to train again")
    return state


def finished_run(output_dir: Path, settings: dict, run_name: str | None) -> dict | None:
    """The final metrics of the run in ``output_dir``, when it finished with these settings (and
    this run name, if one is given); else None."""
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    final = json.loads(metrics_file.read_text())
    if final.get("settings") != settings or run_name not in (None, final["run_name"]):
        return None
    return final


def load_checkpoint(engine, path: Path, d: Dist) -> None:
    engine.load_checkpoint(path)
    _set_rng_state(torch.load(path / f"rng_rank{d.rank}.pt", weights_only=False))


# --- outputs --------------------------------------------------------------------------------
class RunLog:
    """Rank 0's sinks: console, ``output_dir/log.jsonl``, W&B (tracking) and the job's status."""

    def __init__(self, cfg: RewardConfig, run_name: str, output_dir: Path, total_steps: int,
                 resumed_step: int | None):
        from rmjob_trainer.status import ReportSender, StatusReporter
        from rmjob_trainer.tracking import start_run

        self.tracker = start_run(cfg, run_name)
        reporter = StatusReporter.from_env()
        self.reporter = ReportSender(reporter) if reporter else None
        self.file = output_dir / "log.jsonl"
        self._start_log(resumed_step)
        self.total_steps = total_steps
        self.eval: dict = {}
        self.output_dir = output_dir

    def _start_log(self, resumed_step: int | None) -> None:
        """One log per run: a new run starts ``log.jsonl`` empty; a resumed one keeps its lines up
        to the checkpoint's step, since the steps after it run (and are logged) again. A line cut
        short by a kill has no newline and is dropped."""
        kept = []
        if resumed_step is not None and self.file.exists():
            kept = [line for line in self.file.read_text().splitlines(keepends=True)
                    if line.endswith("\n") and json.loads(line)["step"] <= resumed_step]
        self.file.write_text("".join(kept))

    def log_dataset(self, cfg: RewardConfig, tokenizer, train_dataset, eval_dataset, output_dir: Path) -> None:
        """A tokenized example on the console; with tracking, the token-length histograms."""
        from datasets import DatasetDict

        from rmjob_trainer.data import PreferenceDatasetProcessor, visualize_token

        visualize_token(train_dataset[0][CHOSEN], tokenizer)
        if cfg.with_tracking:
            splits = DatasetDict(train=train_dataset, **({"eval": eval_dataset} if eval_dataset else {}))
            png = PreferenceDatasetProcessor(tokenizer, cfg).get_token_length_visualization(
                splits, save_path=str(output_dir / "token_length.png"))
            self.tracker.log_image("token_length_visualization", png)

    def log(self, step: int, metrics: dict, benchmark: dict | None = None) -> None:
        """``metrics`` holds ``benchmark``'s scalars when a benchmark was scored at this step."""
        self.eval.update({k: v for k, v in metrics.items() if k.startswith(("eval/", BENCHMARK_PREFIX))})
        with self.file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.tracker.log({k: v for k, v in metrics.items() if not k.startswith(BENCHMARK_PREFIX)},
                         step=metrics["episode"])
        if benchmark is not None:
            self.log_benchmark(benchmark, metrics["episode"])
        self.report(step, metrics)

    def log_benchmark(self, result: dict, episode: int) -> None:
        """Console summary, ``output_dir/benchmark.json`` + ``.png`` (the latest scoring), W&B."""
        tqdm.write(summary_line(result))
        png = write_report(result, self.output_dir / "benchmark.json", self.output_dir / "benchmark.png")
        log_to_wandb(self.tracker, result, step=episode, png_path=png, prefix=BENCHMARK_PREFIX)

    def report(self, step: int, metrics: dict, **extra) -> None:
        if self.reporter is None:
            return
        training = {"step": step, "totalSteps": self.total_steps, "episode": metrics["episode"],
                    "epoch": metrics["epoch"], "trainLoss": metrics["train/rm/loss"],
                    "trainAccuracy": metrics["train/rm/accuracy"], **extra}
        if "eval/rm/loss" in self.eval:
            training.update(evalLoss=self.eval["eval/rm/loss"], evalAccuracy=self.eval["eval/rm/accuracy"],
                            evalRewardMargin=self.eval["eval/rm/reward_margin"])
        if f"{BENCHMARK_PREFIX}overall" in self.eval:
            training["benchmarkAccuracy"] = self.eval[f"{BENCHMARK_PREFIX}overall"]
        if self.tracker.url:
            training["wandbUrl"] = self.tracker.url
        self.reporter.report(training, force=bool(extra.get("done")))

    def close_report(self, timeout: float) -> None:
        """Give the last report up to ``timeout`` seconds to reach the API server."""
        if self.reporter is not None and not self.reporter.close(timeout):
            print(f"the job's status was not updated within {timeout:.0f} s; not waiting any longer")


def write_outputs(engine, tokenizer, cfg: RewardConfig, output_dir: Path, final: dict, run_log: RunLog | None,
                  d: Dist) -> dict:
    """Model (safetensors) + tokenizer + metrics.json, then the optional Hub push."""
    engine.save_model(output_dir)  # collective under ZeRO-3
    if not d.is_main:
        return final
    tokenizer.save_pretrained(output_dir)
    (output_dir / "metrics.json").write_text(json.dumps(final, indent=2))
    return publish(cfg, output_dir, final, run_log)


def publish(cfg: RewardConfig, output_dir: Path, final: dict, run_log: RunLog) -> dict:
    """The Hub push, unless metrics.json records one already, and the job's final status."""
    if cfg.push_to_hub and "hub" not in final:
        from rmjob_trainer.hub import push_to_hub

        # The settings are the run's identity, not results for the model card.
        final["hub"] = push_to_hub(cfg, output_dir, {k: v for k, v in final.items() if k != "settings"})
        (output_dir / "metrics.json").write_text(json.dumps(final, indent=2))
        run_log.tracker.link_hub(final["hub"]["url"])
    run_log.report(final["step"], final, done=True, **({"hub": final["hub"]} if "hub" in final else {}))
    run_log.tracker.finish()
    run_log.close_report(FINAL_REPORT_TIMEOUT_S)
    return final


def finish_again(cfg: RewardConfig, output_dir: Path, final: dict, d: Dist) -> dict:
    """A restart of a run that finished (its pod replaced after metrics.json was written, during
    the Hub push say): the model stays as it is; the Hub push, if it did not happen, and the
    job's final status are done (again)."""
    if d.is_main:
        print(f"run {final['run_name']}: finished already ({output_dir / 'metrics.json'}); not training again")
        # No new W&B run: it would hold nothing; the finished run's own holds the history.
        run_log = RunLog(dataclasses.replace(cfg, with_tracking=False), final["run_name"], output_dir,
                         final["step"], resumed_step=final["step"])
        run_log.eval.update({k: v for k, v in final.items() if k.startswith(("eval/", BENCHMARK_PREFIX))})
        final = publish(cfg, output_dir, final, run_log)
    leave_distributed()
    return final


# --- the loop -------------------------------------------------------------------------------
def train(cfg: RewardConfig) -> dict:
    """Train, or finish a run that trained already. On SIGTERM (:mod:`rmjob_trainer.preemption`)
    every rank stops after the step in progress, the step is checkpointed and :class:`Preempted`
    (exit status :data:`EXIT_PREEMPTED`) raised; the same call again resumes from it."""
    with SigtermWatch() as sigterm:
        return _train(cfg, sigterm)


def _stop_requested(sigterm: SigtermWatch, d: Dist) -> bool:
    """Whether any rank got SIGTERM (a collective: every rank gets the same answer)."""
    return all_reduce_sum(torch.tensor([float(sigterm.requested)], device=d.device)).item() > 0


def _train(cfg: RewardConfig, sigterm: SigtermWatch) -> dict:
    from rmjob_trainer.data import build_datasets

    ds_settings = deepspeed_settings(cfg)
    d = init_distributed(need_process_group=ds_settings is not None)
    # Built (and its batch sizes checked) before any data is loaded.
    ds_config = (build_deepspeed_config(ds_settings, cfg, d.world_size, resolve_precision(cfg, d.device))
                 if ds_settings is not None else None)
    output_dir = Path(cfg.output_dir)
    benchmark_data = load_eval_benchmark(cfg.eval_benchmark) if cfg.eval_benchmark else None
    tokenizer = load_tokenizer(cfg)
    with main_process_first(d):
        train_dataset, eval_dataset = build_datasets(cfg, tokenizer)

    micro_batch_size = cfg.per_device_train_batch_size
    batch_size = micro_batch_size * cfg.gradient_accumulation_steps * d.world_size
    total_episodes = cfg.total_episodes or cfg.num_train_epochs * len(train_dataset)
    num_training_steps = total_episodes // batch_size
    if num_training_steps == 0:
        raise DataError(f"{total_episodes} training pairs make no full batch of {batch_size} "
                        "(per_device_train_batch_size x gradient_accumulation_steps x processes)")
    eval_steps = {math.ceil(k * num_training_steps / cfg.num_evals) for k in range(1, cfg.num_evals + 1)}
    # The benchmark also scores the final model, with or without an eval set.
    benchmark_steps = (eval_steps | {num_training_steps}) if cfg.eval_benchmark else set()
    if eval_dataset is None or len(eval_dataset) == 0:
        eval_steps = set()
    order = DataOrder(len(train_dataset), cfg.seed, batch_size, d.world_size, micro_batch_size)
    settings = optimization_settings(
        cfg, d.world_size, len(train_dataset), total_episodes, engine_kind(ds_config),
        deepspeed=deepspeed_optimization(ds_config),
        train_data=broadcast_object(data_hash(train_dataset) if d.is_main else None))
    finished = broadcast_object(finished_run(output_dir, settings, cfg.run_name)) if cfg.resume else None
    if finished:
        return finish_again(cfg, output_dir, finished, d)

    checkpoint = latest_checkpoint(output_dir) if cfg.resume else None
    checkpoint = broadcast_object(checkpoint)  # every rank resumes from the same one
    resumed = resumable_state(checkpoint, output_dir, settings) if checkpoint else None

    torch.manual_seed(cfg.seed)  # identical model init on every rank
    engine = build_engine(cfg, tokenizer, d, num_training_steps, ds_settings, ds_config)
    local_seed = cfg.seed + d.rank
    random.seed(local_seed), np.random.seed(local_seed), torch.manual_seed(local_seed)

    if resumed:
        load_checkpoint(engine, checkpoint, d)
        start_step, run_name = resumed["step"], resumed["run_name"]
    else:
        start_step = 0
        run_name = broadcast_object(cfg.run_name or f"{cfg.exp_name}__{cfg.seed}__{int(time.time())}")
    run_log = None
    if d.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            # A new run replaces whatever finished in output_dir before: no old metrics.json next
            # to a model in the making, and no older run's checkpoints (rotation keeps the highest
            # steps, which could be theirs, and a later resume would continue them).
            (output_dir / "metrics.json").unlink(missing_ok=True)
            shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        print(f"run {run_name}: {num_training_steps} steps of {batch_size} pairs on {d.world_size} process(es)"
              + (f", resuming from {checkpoint}" if checkpoint else ""))
        run_log = RunLog(cfg, run_name, output_dir, num_training_steps, start_step if resumed else None)
        run_log.log_dataset(cfg, tokenizer, train_dataset, eval_dataset, output_dir)

    def evaluate_and_log(done: int, step_metrics: dict) -> None:
        """The evaluation and benchmark scheduled after optimizer step ``done``, then its log line."""
        if done in eval_steps:
            eval_metrics, rows = evaluate(engine, eval_dataset, tokenizer, cfg, d)
            step_metrics.update(eval_metrics)
            if d.is_main:
                tqdm.write(" ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
                print_samples(rows)
                run_log.tracker.log_table("preference_sample_texts",
                                          ["chosen_text", "rejected_text", "chosen_reward", "rejected_reward"], rows)
        benchmark = score_benchmark(engine, tokenizer, benchmark_data, cfg, d) if done in benchmark_steps else None
        if benchmark is not None:
            step_metrics.update(benchmark_metrics(benchmark, BENCHMARK_PREFIX))
        if d.is_main:
            run_log.log(done, step_metrics, benchmark)

    def leave_preempted(checkpointed: int | None) -> None:
        engine.close()
        leave_distributed()
        if run_log is not None:  # the W&B run's history, up to this step, reaches its files
            run_log.tracker.finish(exit_code=EXIT_PREEMPTED)
        if d.is_main:
            saved = f"checkpoint step_{checkpointed} written" if checkpointed else "no step taken: nothing to save"
            print(f"SIGTERM: stopped ({saved}); exit status {EXIT_PREEMPTED}: the same command resumes the run",
                  flush=True)
        raise Preempted(checkpointed)

    if _stop_requested(sigterm, d):  # while the data, model or checkpoint loaded: nothing to save
        leave_preempted(None)
    if resumed and "unlogged_metrics" in resumed:
        evaluate_and_log(start_step, resumed["unlogged_metrics"])

    metrics: dict = {}
    train_margins = margins_of(train_dataset)
    engine.train()
    for step in tqdm(range(start_step, num_training_steps), initial=start_step, total=num_training_steps,
                     disable=not d.is_main, desc="train"):
        sums = torch.zeros(NUM_SUMS, device=d.device)
        for micro_step in range(cfg.gradient_accumulation_steps):
            indices = order.micro_batch(step, micro_step, d.rank)
            batch = collate(train_dataset, indices, tokenizer.pad_token_id, cfg.padding_free, d.device,
                            cfg.prefix_sharing)
            chosen, rejected = engine.forward(batch).chunk(2)
            margin = None if train_margins is None else train_margins[indices].to(d.device)
            loss = pair_losses(chosen, rejected, margin, cfg.center_rewards_coefficient).mean()
            engine.backward(loss)  # optimizer + scheduler step on the last micro-step
            sums += pair_sums(chosen.detach(), rejected.detach(), None, margin, cfg.center_rewards_coefficient)
        episode = (step + 1) * batch_size
        # Each rank's SIGTERM rides on the all-reduce of the step's metrics: every rank learns at
        # this same step that one of them was asked to stop. The last step just finishes the run.
        sums = all_reduce_sum(torch.cat([sums, torch.tensor([float(sigterm.requested)], device=d.device)]))
        preempted = sums[-1].item() > 0 and step + 1 < num_training_steps
        metrics = {"episode": episode, "epoch": episode / len(train_dataset),
                   **named_means(sums[:-1], "train/rm/", TRAIN_NAMES), "train/rm/lr": engine.lr}
        # A preempted step's evaluation would spend the grace period: the resumed run does it
        # (on the same weights), then logs the step.
        evaluated = step + 1 in (eval_steps | benchmark_steps)
        unlogged = preempted and evaluated
        if not unlogged:
            evaluate_and_log(step + 1, metrics)
        last = step + 1 == num_training_steps
        periodic = cfg.checkpointing_steps and (step + 1) % cfg.checkpointing_steps == 0 and not last
        trainer_state = {"step": step + 1, "run_name": run_name, "settings": settings,
                         "data_order": order.state(step + 1), **({"unlogged_metrics": metrics} if unlogged else {})}
        if preempted or periodic:
            save_checkpoint(engine, output_dir, step + 1, trainer_state, d, cfg.checkpoints_total_limit)
        # A SIGTERM that came during this step's evaluation or checkpoint would wait for the next
        # step's all-reduce: one more step, and one more checkpoint, within the grace period.
        if (evaluated or periodic) and not (preempted or last) and _stop_requested(sigterm, d):
            if not periodic:
                save_checkpoint(engine, output_dir, step + 1, trainer_state, d, cfg.checkpoints_total_limit)
            preempted = True
        if preempted:
            leave_preempted(step + 1)

    final = {"run_name": run_name, "step": num_training_steps, **metrics,  # the last step evaluated
             "settings": settings}
    stats = normalization_stats(engine, train_dataset, tokenizer, cfg, d, final)
    for key, value in stats.items():
        setattr(engine.hf_model.config, key, value)  # saved in config.json with the model
    # metrics.json holds numbers (and the run's identity); the set's name is in config.json
    final.update(reward_mean=stats["reward_mean"], reward_std=stats["reward_std"])
    final = write_outputs(engine, tokenizer, cfg, output_dir, final, run_log, d)
    engine.close()
    leave_distributed()
    return final
