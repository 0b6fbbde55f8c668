"""`make gpu-check`: the GPU path checked and measured in one run (under 8 minutes on one H200).

    python bench/gpu_check.py [--device cuda] [--steps 30] [--batch-size 8] [--out bench/results]
    python bench/gpu_check.py --device cpu --tiny      # the same plumbing in seconds (the CI test)

1. Rewards agree: the same random-init model scores the same pairs through the trainer's own
   evaluation path (``rmjob_trainer.train.score`` on an engine from ``build_engine``) six ways:
   padded, padding-free and padding-free with ``prefix_sharing``, each in fp32 and in bf16 --
   each only a RewardConfig flag, so this runs whatever the trainer does for that flag. fp32
   padding-free and prefix-shared (sdpa: flash-attention takes no fp32) must agree with fp32
   padded within 1e-4 of the fp32 rewards' RMS, tight enough to catch a wrong position or mask
   that bf16's rounding hides; bf16 padding-free and prefix-shared (flash-attention where it
   runs) with bf16 padded within the bf16 tolerance (below). Prefix sharing must really compute
   fewer tokens (counted at the embedding).
2. Attention: flash-attention 2 (varlen, driven by the packed batch's ``cu_seq_lens``) only
   where the ``flash_attn`` package is installed and the device is CUDA, else sdpa (the
   trainer's per-sequence ``sdpa_varlen``); the report says which ran and why (the H200 image
   has no flash_attn and PyPI no binary wheel of it, so there the check runs sdpa on CUDA and
   says so). The implementation the model actually ran is read back and must be that one
   (prefix sharing runs through ``sdpa_varlen`` and, in bf16, calls flash-attention for its
   shared layout where installed).
3. Throughput: a random-init Llama-shaped model (``--model 1b``: hidden 2048, 16 layers, 32 heads,
   MLP 8192, Llama-3.2-1B's shape with full-width KV heads, 1.08 B parameters) trained for
   ``--steps`` steps of ``--batch-size`` pairs of multi-turn conversations up to 1,024 tokens,
   in bf16 autocast over fp32 weights, by ``rmjob_trainer.train.train`` (padding-free, then with
   prefix sharing) and by TRL's ``RewardTrainer`` (same model files, same token ids, same
   batch, optimizer and precision; gradient checkpointing off for both). Reported: pairs/s and
   real tokens/s over the steps after ``--warmup-steps``, peak GPU memory, and MFU.

Timing: each trainer's step ends are taken as they happen, rmjob's from the line each step adds
to ``output_dir/log.jsonl`` (written after the step's metrics are read back from the device),
TRL's from a ``TrainerCallback.on_step_end`` that synchronizes the device first. Throughput is
(timed steps x batch) pairs over the time from the end of step ``--warmup-steps`` to the end of
the last step but one (rmjob's last step includes its final evaluation); tokens/s multiplies by
the data's mean real tokens per pair (the batches are random draws from it, in both trainers).

MFU counts the FLOPs a pair needs without padding and without prefix sharing: per sequence of
T tokens, 6 * N * T (N: non-embedding parameters) + 6 * layers * hidden * T**2 (causal attention,
forward and backward), over the device's dense bf16 peak (989.4 TFLOP/s for the H100 and H200
SXM, known by their exact device names; ``--peak-tflops`` on any other GPU, which is an error
without it). Padding and prefix sharing change the FLOPs done, not those counted, so a
padded trainer's MFU shows its waste and prefix sharing's can exceed what the hardware did.

bf16 tolerance: a variant agrees when its rewards differ from bf16 padded's by at most 3x the
largest difference between bf16 padded and fp32 padded (what bf16 itself costs on this model
and data), or 2% of the fp32 rewards' RMS, whichever is larger.

Writes ``<out>/gpu-check-<timestamp>.json`` and ``.md`` (a block for docs/benchmarks.md, also
printed). Exit status 1 when a check fails, 2 for bad arguments or missing packages.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_cli import OneLineParser

REPO = Path(__file__).resolve().parents[1]
# Imported at module level by the trainer or TRL, and not part of torch's usual company: the
# wheels `make gpu-wheels` carries to a machine without network are these.
REQUIRED = ("torch", "transformers", "datasets", "trl", "rmjob_trainer", "xxhash", "yaml", "pyarrow", "tqdm")
CARRIED = ("datasets", "trl")  # what `make gpu-wheels` brings (with dill and multiprocess, datasets' own)
MODELS = {  # hidden_size, num_layers, num_heads (Llama, intermediate 4 x hidden)
    "1b": (2048, 16, 32),
    "tiny": (64, 2, 4),
}
# torch.cuda.get_device_name() of the SXM parts, whose datasheets give 989.4 TFLOP/s dense bf16
# (without sparsity). Exact names only: the PCIe and NVL cards and GH200 share the prefixes but
# not the peak.
DENSE_BF16_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H200": 989.4}
VARIANTS = {  # name -> RewardConfig flags; each precision's padded variant is its packed ones' reference
    "fp32_padded": {"mixed_precision": "no", "padding_free": False},
    "fp32_padding_free": {"mixed_precision": "no", "padding_free": True, "prefix_sharing": False},
    "fp32_prefix_shared": {"mixed_precision": "no", "padding_free": True, "prefix_sharing": True},
    "bf16_padded": {"mixed_precision": "bf16", "padding_free": False},
    "bf16_padding_free": {"mixed_precision": "bf16", "padding_free": True, "prefix_sharing": False},
    "bf16_prefix_shared": {"mixed_precision": "bf16", "padding_free": True, "prefix_sharing": True},
}
TOLERANCE_NOISE_FACTOR, TOLERANCE_RMS_FRACTION = 3.0, 0.02
# fp32 packed vs fp32 padded differ only in summation order; bf16's rounding (~1/128 relative)
# would hide a wrong rotary position in the prefix-shared rows, fp32's does not.
FP32_TOLERANCE_RMS_FRACTION = 1e-4
SCORE_ROWS = 10  # train.score returns the rewards of its first NUM_SAMPLE_ROWS (10) pairs


class CheckError(Exception):
    """One line saying what is wrong (printed as ``error: ...``, exit status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where everything runs (default cuda)")
    p.add_argument("--tiny", action="store_true",
                   help="plumbing check: tiny model, sequences up to 128 tokens, 4 steps (numbers meaningless)")
    p.add_argument("--model", choices=MODELS, help="model shape (default 1b; tiny with --tiny)")
    p.add_argument("--max-length", type=int, help="longest sequence in tokens (default 1024; 128 with --tiny)")
    p.add_argument("--steps", type=int, help="optimizer steps per throughput run (default 30; 4 with --tiny)")
    p.add_argument("--warmup-steps", type=int, help="first steps left out of the timing (default 3; 1 with --tiny)")
    p.add_argument("--batch-size", type=int, help="pairs per optimizer step (default 8; 2 with --tiny)")
    p.add_argument("--agreement-pairs", type=int, help="pairs scored by every variant (default 40; 10 with --tiny)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense bf16 peak for MFU (default: known for the H100 and H200 SXM; "
                        "required on other GPUs)")
    p.add_argument("--seed", type=int, default=1, help="model, data and training seed")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the JSON and .md go")
    args = p.parse_args(argv)
    defaults = ({"model": "tiny", "max_length": 128, "steps": 4, "warmup_steps": 1, "batch_size": 2,
                 "agreement_pairs": 10} if args.tiny else
                {"model": "1b", "max_length": 1024, "steps": 30, "warmup_steps": 3, "batch_size": 8,
                 "agreement_pairs": 40})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, value in (("--max-length", args.max_length), ("--steps", args.steps),
                        ("--batch-size", args.batch_size), ("--agreement-pairs", args.agreement_pairs)):
        if value < 1:
            p.error(f"{flag} {value}: must be at least 1")
    if args.max_length < 64:
        p.error(f"--max-length {args.max_length}: must be at least 64 (a conversation's turns need room)")
    if not 1 <= args.warmup_steps <= args.steps - 2:
        p.error(f"--warmup-steps {args.warmup_steps}: must be at least 1 and at most --steps - 2 "
                f"({args.steps - 2}): the steps between are timed, and the last one is not")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops {args.peak_tflops}: must be positive")
    return args


def check_packages() -> None:
    """Every package importable, and the carried ones' requirements met by what the machine has:
    a wheel installed without its dependencies could otherwise fail minutes into the run."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise CheckError(f"missing Python packages: {', '.join(missing)} (on a machine without network, "
                         "`make gpu-wheels` where PyPI is reachable, carry build/gpu-wheels, then `make gpu-check`)")
    from packaging.requirements import Requirement

    unmet = []
    for name in CARRIED:
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                found = None
            if found is None or not requirement.specifier.contains(found, prereleases=True):
                unmet.append(f"{name} needs {requirement}, found {found or 'none'}")
    if unmet:
        raise CheckError(f"{'; '.join(unmet)} (carry those too: make gpu-wheels GPU_PACKAGES='...')")


# --- data -------------------------------------------------------------------------------------
def conversation_words(max_length: int) -> tuple[int, int, int, int]:
    """(shared-prefix words low, high, response words low, high) for sequences up to ``max_length``
    tokens: multi-turn prompts holding most of the tokens, as in hh-rlhf or UltraFeedback."""
    budget = max_length * 0.7  # ~1.3 tokens per word with the bundled tokenizer, and the template's
    return int(budget * 0.35), int(budget * 0.75), int(budget * 0.04), int(budget * 0.22)


def make_conversations(n: int, max_length: int, seed: int) -> list[dict]:
    """``n`` pairs: 1-4 shared turns, then a chosen and a rejected final answer."""
    import numpy as np

    from rmjob_trainer.tiny import bundled_texts

    words = sorted({w for text in bundled_texts() for w in text.split()})
    rng = np.random.default_rng(seed)
    prefix_low, prefix_high, response_low, response_high = conversation_words(max_length)

    def text(count: int) -> str:
        return " ".join(words[i] for i in rng.integers(len(words), size=max(count, 1)))

    rows = []
    for _ in range(n):
        turns = int(rng.integers(1, 5))
        per_turn = int(rng.integers(prefix_low, prefix_high + 1)) // (2 * turns - 1)
        messages = []
        for turn in range(2 * turns - 1):
            messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text(per_turn)})
        rows.append({side: messages + [{"role": "assistant", "content": text(
            int(rng.integers(response_low, response_high + 1)))}] for side in ("chosen", "rejected")})
    return rows


def write_data(path: Path, train_pairs: int, eval_pairs: int, max_length: int, seed: int) -> Path:
    from datasets import Dataset

    (path / "data").mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", train_pairs, seed), ("test", eval_pairs, seed + 1)):
        Dataset.from_list(make_conversations(n, max_length, split_seed)).to_parquet(
            str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path


def data_stats(dataset) -> dict:
    chosen = [len(s) for s in dataset["input_ids_chosen"]]
    rejected = [len(s) for s in dataset["input_ids_rejected"]]
    shared = [len(os.path.commonprefix([c, r])) for c, r in zip(dataset["input_ids_chosen"],
                                                                 dataset["input_ids_rejected"])]
    lengths = chosen + rejected
    return {"pairs": len(chosen), "tokens_per_pair": sum(lengths) / len(chosen),
            "seq_len_median": statistics.median(lengths), "seq_len_max": max(lengths),
            "shared_prefix_tokens_per_pair": sum(shared) / len(shared),
            # what computing each shared prefix once saves
            "prefix_sharing_saves": sum(shared) / sum(lengths)}


def flops_per_pair(dataset, non_embedding_params: int, layers: int, hidden: int) -> float:
    """Training FLOPs of a pair's real tokens, unshared (see the module docstring)."""
    total = 0.0
    for column in ("input_ids_chosen", "input_ids_rejected"):
        for sequence in dataset[column]:
            t = len(sequence)
            total += 6 * non_embedding_params * t + 6 * layers * hidden * t * t
    return total / len(dataset)


# --- 1 + 2: rewards of the variants -----------------------------------------------------------
def build_model(args, work: Path) -> Path:
    """The random-init ``--model`` every variant and trainer loads, saved under ``work``."""
    from rmjob_trainer.tiny import build_tiny_model

    hidden, layers, heads = MODELS[args.model]
    return build_tiny_model(work / "model", arch="llama", hidden_size=hidden, num_layers=layers, num_heads=heads,
                            max_position_embeddings=max(2048, args.max_length), seed=args.seed)


def base_config(args, model: Path, data: Path, attn: str | None, **extra) -> dict:
    return dict(dataset_mixer={str(data): 1.0}, model_name_or_path=str(model), max_token_length=args.max_length,
                per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=max(args.batch_size // 2, 1),
                learning_rate=1e-5, seed=args.seed, num_proc=1, resume=False, attn_implementation=attn,
                gradient_checkpointing=False, **extra)


def free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attention_used(model, fp32: bool) -> str:
    """The attention the model ran. Prefix sharing runs through ``sdpa_varlen`` and, for its
    shared layout in fp16/bf16, calls the flash-attention implementation it chose on the first
    batch (rmjob_trainer.prefix_sharing keeps it on the model as ``_rmjob_flash``); fp32 queries
    stay on sdpa."""
    used = model.config._attn_implementation
    flash = None if fp32 else getattr(model, "_rmjob_flash", None)
    return f"{used} + {flash} (shared layout)" if flash else used


def expected_attention(flash_installed: bool) -> dict[str, str]:
    expected = {"fp32_padding_free": "sdpa_varlen", "fp32_prefix_shared": "sdpa_varlen"}
    if flash_installed:
        return {**expected, "bf16_padding_free": "flash_attention_2",
                "bf16_prefix_shared": "sdpa_varlen + flash_attention_2 (shared layout)"}
    return {**expected, "bf16_padding_free": "sdpa_varlen", "bf16_prefix_shared": "sdpa_varlen"}


def attention_kernel(device: str, flash_installed: bool) -> str:
    """Which attention the bf16 packed variants and the throughput runs use, and why."""
    if flash_installed:
        return "flash_attention_2 (flash_attn installed)"
    if device == "cpu":
        return "sdpa (--device cpu: flash-attention needs CUDA)"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa (flash_attn not installed)"
    return "sdpa (flash_attn installed, but transformers cannot use it: is_flash_attn_2_available() is False)"


def agreement(args, model: Path, data: Path, attn: str | None, flash_installed: bool) -> dict:
    import torch

    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.distributed import build_engine, init_distributed
    from rmjob_trainer.model import load_tokenizer
    from rmjob_trainer.train import score

    d = init_distributed(need_process_group=False)
    rewards, tokens, used, params = {}, {}, {}, {}
    eval_dataset = None
    for name, flags in VARIANTS.items():
        # flash-attention takes no fp32: the fp32 reference always runs sdpa
        variant_attn = None if flags["mixed_precision"] == "no" else attn
        cfg = RewardConfig(**base_config(args, model, data, variant_attn, output_dir=str(data.parent / "unused")),
                           **flags)
        tokenizer = load_tokenizer(cfg)
        if eval_dataset is None:
            _, eval_dataset = build_datasets(cfg, tokenizer)
            eval_dataset = eval_dataset.select(range(min(args.agreement_pairs, len(eval_dataset))))
        torch.manual_seed(cfg.seed)  # the score head's initialization, as train() seeds it
        engine = build_engine(cfg, tokenizer, d, 1, None, None)
        if not params:
            embedding = engine.hf_model.get_input_embeddings().weight.numel()
            params = {"total": sum(p.numel() for p in engine.hf_model.parameters())}
            params["non_embedding"] = params["total"] - embedding
        counted = [0]
        hook = engine.hf_model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: counted.__setitem__(0, counted[0] + inputs[0].numel()))
        pairs = []
        for start in range(0, len(eval_dataset), SCORE_ROWS):
            chunk = eval_dataset.select(range(start, min(start + SCORE_ROWS, len(eval_dataset))))
            _, rows = score(engine, chunk, tokenizer, cfg, d)
            pairs += [(row[2], row[3]) for row in rows]
        hook.remove()
        rewards[name], tokens[name] = pairs, counted[0]
        used[name] = attention_used(engine.hf_model, fp32=flags["mixed_precision"] == "no")
        del engine
        free_device_memory()

    reference = [r for pair in rewards["fp32_padded"] for r in pair]
    rms = math.sqrt(sum(r * r for r in reference) / len(reference))

    def max_difference(a: str, b: str) -> float:
        return max(abs(x - y) for pa, pb in zip(rewards[a], rewards[b]) for x, y in zip(pa, pb))

    fp32_tolerance = FP32_TOLERANCE_RMS_FRACTION * rms
    fp32_differences = {name: max_difference(name, "fp32_padded")
                        for name in ("fp32_padding_free", "fp32_prefix_shared")}
    bf16_noise = max_difference("bf16_padded", "fp32_padded")
    tolerance = max(TOLERANCE_NOISE_FACTOR * bf16_noise, TOLERANCE_RMS_FRACTION * rms)
    differences = {name: max_difference(name, "bf16_padded") for name in ("bf16_padding_free", "bf16_prefix_shared")}
    expected = expected_attention(flash_installed)
    packed_attention_ok = all(used[name] == expected[name] for name in expected)
    prefix_effective = all(tokens[f"{precision}_prefix_shared"] < tokens[f"{precision}_padding_free"]
                           for precision in ("fp32", "bf16"))
    return {
        "pairs": len(reference) // 2, "reward_rms_fp32": rms,
        "fp32_tolerance": fp32_tolerance, "max_diff_vs_fp32_padded": fp32_differences,
        "fp32_rewards_agree": all(value <= fp32_tolerance for value in fp32_differences.values()),
        "bf16_padded_vs_fp32_max_diff": bf16_noise, "tolerance": tolerance,
        "max_diff_vs_bf16_padded": differences,
        "bf16_rewards_agree": all(value <= tolerance for value in differences.values()),
        "tokens_computed": tokens,
        "prefix_sharing_effective": prefix_effective,
        "attention_used": used, "attention_expected": expected,
        "attention_ok": packed_attention_ok,
        "parameters": params,
        "rewards": rewards,
    }


# --- 3: throughput ----------------------------------------------------------------------------
class LogLineClock(threading.Thread):
    """The time each line appears in a file the trainer appends to (its log.jsonl, one per step)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.times, self.done = path, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self._read()
            time.sleep(0.002)
        self._read()  # a line written while this thread slept last (the last step's: it is not timed)

    def _read(self) -> None:
        try:
            lines = self.path.read_bytes().count(b"\n")
        except FileNotFoundError:
            lines = 0
        now = time.perf_counter()
        self.times += [now] * (lines - len(self.times))

    def stop(self) -> list[float]:
        self.done.set()
        self.join()
        return self.times


def throughput(step_ends: list[float], args, data: dict, pair_flops: float, peak_tflops: float | None,
               name: str = "") -> dict:
    if len(step_ends) < args.steps:
        raise CheckError(f"{name}: {len(step_ends)} step ends recorded, expected {args.steps}")
    last = args.steps - 2  # the end of the last step but one
    elapsed = step_ends[last] - step_ends[args.warmup_steps - 1]
    pairs_per_s = (last + 1 - args.warmup_steps) * args.batch_size / elapsed
    return {"pairs_per_s": pairs_per_s, "tokens_per_s": pairs_per_s * data["tokens_per_pair"],
            "mfu": pairs_per_s * pair_flops / (peak_tflops * 1e12) if peak_tflops else None,
            "timed_s": elapsed, "step_s": [b - a for a, b in zip(step_ends, step_ends[1:])]}


def peak_gpu_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_gpu_gib": None}
    return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}


def reset_peak_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_rmjob(args, name: str, flags: dict, model: Path, data: Path, attn: str | None, work: Path) -> list[float]:
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.train import train

    output_dir = work / name
    cfg = RewardConfig(**base_config(args, model, data, attn, output_dir=str(output_dir), mixed_precision="bf16",
                                     total_episodes=args.steps * args.batch_size, num_evals=1), **flags)
    clock = LogLineClock(output_dir / "log.jsonl")
    clock.start()
    try:
        train(cfg)
    finally:
        step_ends = clock.stop()
    return step_ends


def run_trl(args, model: Path, tokenized: Path, attn: str | None, work: Path) -> list[float]:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    config = RewardConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-5, adam_epsilon=1e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, max_length=args.max_length,
        bf16=True, gradient_checkpointing=False,  # as rmjob: bf16 autocast over fp32 weights, no recomputation
        model_init_kwargs={"attn_implementation": attn} if attn else None,
        use_cpu=args.device == "cpu", eval_strategy="no", save_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True, logging_steps=args.steps, seed=args.seed)
    trainer = RewardTrainer(model=str(model), args=config, train_dataset=load_from_disk(str(tokenized)),
                            processing_class=AutoTokenizer.from_pretrained(str(model)), callbacks=[StepClock()])
    trainer.train()
    del trainer
    return step_ends


# --- the run ----------------------------------------------------------------------------------
def environment(args) -> dict:
    import torch

    versions = {name: importlib.metadata.version(name) for name in
                ("torch", "transformers", "datasets", "trl", "accelerate")}
    info = {"python": platform.python_version(), **versions, "device": args.device,
            "flash_attn": (importlib.metadata.version("flash_attn")
                           if importlib.util.find_spec("flash_attn") else None)}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                            if line.startswith("model name")), platform.processor())
    return info


def peak_tflops_of(args, env: dict) -> float | None:
    """The dense bf16 peak MFU is counted against: ``--peak-tflops``, else the known GPU's, else
    none on the CPU; an unknown GPU is an error before anything runs, not an MFU against another
    part's peak."""
    if args.peak_tflops:
        return args.peak_tflops
    gpu = env.get("gpu")
    if gpu is None:
        return None
    if gpu not in DENSE_BF16_PEAK_TFLOPS:
        raise CheckError(f"GPU {gpu!r} has no known dense bf16 peak (known: {', '.join(DENSE_BF16_PEAK_TFLOPS)}): "
                         "pass --peak-tflops for its MFU")
    return DENSE_BF16_PEAK_TFLOPS[gpu]


def run(args, work: Path) -> dict:
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = now - since
        print(f"{name}: {now - since:.1f} s", flush=True)
        return now

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CheckError("--device cuda: torch sees no CUDA device (torch "
                         f"{torch.__version__}); use --device cpu --tiny for the plumbing check")
    from transformers.utils import is_flash_attn_2_available

    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.model import load_tokenizer

    env = environment(args)
    peak = peak_tflops_of(args, env)
    flash_installed = args.device == "cuda" and is_flash_attn_2_available()
    attn = "flash_attention_2" if flash_installed else None  # None: the trainer's default, sdpa

    hidden, layers, heads = MODELS[args.model]
    model = build_model(args, work)
    data = write_data(work / "data", 2 * args.steps * args.batch_size + 8, args.agreement_pairs + 8,
                      args.max_length, args.seed)
    cfg = RewardConfig(**base_config(args, model, data, attn, output_dir=str(work / "unused")))
    train_dataset, _ = build_datasets(cfg, load_tokenizer(cfg))
    if len(train_dataset) < args.steps * args.batch_size:
        raise CheckError(f"only {len(train_dataset)} of the generated pairs fit in {args.max_length} tokens, "
                         f"{args.steps * args.batch_size} needed")
    tokenized = work / "tokenized"
    columns = {"input_ids_chosen": "chosen_ids", "input_ids_rejected": "rejected_ids"}
    train_dataset.select_columns(list(columns)).rename_columns(columns).save_to_disk(str(tokenized))
    stats = data_stats(train_dataset)
    now = phase("model and data", started)

    agree = agreement(args, model, data, attn, flash_installed)
    now = phase("reward agreement", now)
    pair_flops = flops_per_pair(train_dataset, agree["parameters"]["non_embedding"], layers, hidden)

    runs = {}
    for name, flags in (("rmjob_padding_free", {"padding_free": True, "prefix_sharing": False}),
                        ("rmjob_prefix_shared", {"padding_free": True, "prefix_sharing": True}),
                        ("trl", None)):
        free_device_memory()
        reset_peak_gpu_memory()
        step_ends = (run_trl(args, model, tokenized, attn, work) if flags is None
                     else run_rmjob(args, name, flags, model, data, attn, work))
        runs[name] = {**throughput(step_ends, args, stats, pair_flops, peak, name), **peak_gpu_memory()}
        now = phase(name, now)
    ratios = {name: {"pairs_per_s": runs[name]["pairs_per_s"] / runs["trl"]["pairs_per_s"],
                     "peak_gpu": (runs[name]["peak_gpu_gib"] / runs["trl"]["peak_gpu_gib"]
                                  if runs["trl"]["peak_gpu_gib"] else None)}
              for name in ("rmjob_padding_free", "rmjob_prefix_shared")}
    checks = {"fp32_rewards_agree": agree["fp32_rewards_agree"], "bf16_rewards_agree": agree["bf16_rewards_agree"],
              "attention_ok": agree["attention_ok"],
              "prefix_sharing_effective": agree["prefix_sharing_effective"]}
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": env, "passed": all(checks.values()), "checks": checks,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "model": {"arch": "llama", "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                  "intermediate_size": 4 * hidden, **agree["parameters"]},
        "attention": {"flash_attn_installed": flash_installed, "kernel": attention_kernel(args.device, flash_installed),
                      "requested": attn or "sdpa (trainer default)", "used": agree["attention_used"]},
        "data": stats, "flops_per_pair": pair_flops, "peak_tflops": peak,
        "agreement": agree, "runs": runs, "ratios_vs_trl": ratios,
        "phases_s": phases, "wall_s": time.perf_counter() - started,
    }


def markdown(result: dict) -> str:
    env, agree, data = result["environment"], result["agreement"], result["data"]
    where = env.get("gpu") or f"CPU ({env.get('cpu')})"
    s = result["settings"]
    model = result["model"]

    def number(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"### GPU check, {result['timestamp']} on {where}",
        "",
        f"`{result['command']}`: torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}, "
        f"datasets {env['datasets']}, flash-attn {env['flash_attn'] or 'not installed'}; whole run "
        f"{result['wall_s']:.0f} s. Checks: **{'passed' if result['passed'] else 'FAILED'}** "
        f"({', '.join(f'{k} {v}' for k, v in result['checks'].items())}).",
        "",
        f"Model: random-init Llama, hidden {model['hidden_size']}, {model['num_layers']} layers, "
        f"{model['num_heads']} heads, MLP {model['intermediate_size']}, {model['total'] / 1e6:,.1f} M parameters "
        f"({model['non_embedding'] / 1e6:,.1f} M without the embedding). Data: {data['pairs']} multi-turn pairs up to "
        f"{s['max_length']} tokens, {data['tokens_per_pair']:.0f} real tokens per pair (sequence median "
        f"{data['seq_len_median']:.0f}, max {data['seq_len_max']}), shared prefix {data['shared_prefix_tokens_per_pair']:.0f} "
        f"tokens per pair: prefix sharing computes {100 * data['prefix_sharing_saves']:.0f}% fewer tokens.",
        "",
        f"Attention: {result['attention']['kernel']}.",
        "",
        f"Rewards of {agree['pairs']} pairs, max |difference| to the padded variant of the same precision "
        f"(fp32 rewards' RMS {agree['reward_rms_fp32']:.3f}; tolerance fp32 {agree['fp32_tolerance']:.1e}, "
        f"bf16 {agree['tolerance']:.4f}; bf16 padded vs fp32 padded {agree['bf16_padded_vs_fp32_max_diff']:.4f}):",
        "",
        "| variant | vs padded | tokens computed | attention |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        precision, layout = name.split("_", 1)
        difference = (agree["max_diff_vs_fp32_padded"].get(name) if precision == "fp32"
                      else agree["max_diff_vs_bf16_padded"].get(name))
        lines.append(f"| {precision} {layout.replace('_', '-')} | "
                     f"{'-' if difference is None else format(difference, '.1e' if precision == 'fp32' else '.4f')} | "
                     f"{agree['tokens_computed'][name]} | {agree['attention_used'][name]} |")
    timed = s["steps"] - 1 - s["warmup_steps"]
    lines += [
        "",
        f"Throughput: {s['steps']} steps of {s['batch_size']} pairs, bf16 autocast over fp32 weights, steps "
        f"{s['warmup_steps'] + 1}-{s['steps'] - 1} timed ({timed}); MFU of "
        f"{number(result['peak_tflops'], '.1f')} TFLOP/s dense bf16, counting unshared, unpadded FLOPs:",
        "",
        "| | pairs/s | real tokens/s | peak GPU memory | MFU | pairs/s vs TRL |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("rmjob_padding_free", "rmjob padding-free"), ("rmjob_prefix_shared", "rmjob prefix-shared"),
                        ("trl", "TRL RewardTrainer")):
        run = result["runs"][name]
        ratio = result["ratios_vs_trl"][name]["pairs_per_s"] if name != "trl" else 1.0
        memory = "n/a" if run["peak_gpu_gib"] is None else f"{run['peak_gpu_gib']:.1f} GiB"
        mfu = "n/a" if run["mfu"] is None else f"{100 * run['mfu']:.1f}%"
        lines.append(f"| {label} | {run['pairs_per_s']:.2f} | {run['tokens_per_s']:.0f} | {memory} | {mfu} | "
                     f"{ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the trainer picks cuda when it sees one
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_packages()
        with tempfile.TemporaryDirectory(prefix="rmjob-gpu-check-") as tmp:
            result = run(args, Path(tmp))
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu-check-{time.strftime('%Y%m%dT%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    block = markdown(result)
    stem.with_suffix(".md").write_text(block)
    print(block)
    print(f"wrote {stem}.json and .md")
    if not result["passed"]:
        failed = [name for name, ok in result["checks"].items() if not ok]
        print(f"gpu check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
