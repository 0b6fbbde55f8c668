"""Which CPU attention layout prefix sharing uses: one SDPA call per pair with a block mask, or
SDPA per segment, and the rule that picks one per pair. Times forward + backward of training
steps on a synthetic dataset.

    python bench/prefix_attention.py [--dataset multi-turn] [--pairs 16] [--steps 8] [--threads 1]
    python bench/prefix_attention.py --dataset long-answers [--prompt-tokens 32] [--answer-tokens 1024]

``long-answers``: random token ids, a short prompt and two long answers (every pair alike), the
shape in which the block mask's masked ``R x C`` scores outweigh everything it saves.

Layouts (same rewards, checked before timing):
* ``unshared``: padding-free packing, each sequence its own SDPA call (prefix computed twice);
* ``block-mask``: every pair one SDPA call over ``[P C R]``, the mask hiding ``C`` from ``R``
  (the masked scores, ``R x C`` among them, are computed too);
* ``per-segment``: every pair ``[P C]`` with ``is_causal``, then ``R`` against the keys
  ``[P R]`` (gathered) with a causal mask aligned to the last key: no masked ``R x C`` scores,
  twice the calls;
* ``rule``: what rmjob_trainer.prefix_sharing ships: each pair's layout chosen by
  ``prefix_sharing.block_mask_is_cheaper``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rmjob_trainer import prefix_sharing
from synthetic import DATASETS


def long_answers(n: int, prompt_tokens: int, answer_tokens: int, vocab_size: int):
    """A dataset of ``n`` pairs of random ids: a prompt, then two different answers."""
    ids = torch.randint(1, vocab_size, (n, prompt_tokens + 2 * answer_tokens), generator=torch.Generator().manual_seed(0))
    prompts, chosen, rejected = ids.split([prompt_tokens, answer_tokens, answer_tokens], 1)
    chosen[:, 0], rejected[:, 0] = 1, 2  # the answers differ from their first token on
    from datasets import Dataset

    return Dataset.from_dict({"input_ids_chosen": torch.cat([prompts, chosen], 1).tolist(),
                              "input_ids_rejected": torch.cat([prompts, rejected], 1).tolist()})


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=[*DATASETS, "long-answers"], default="multi-turn")
    p.add_argument("--prompt-tokens", type=int, default=32, help="long-answers: shared prompt length")
    p.add_argument("--answer-tokens", type=int, default=1024, help="long-answers: each answer's length")
    p.add_argument("--pairs", type=int, default=16, help="pairs per step (the benchmark's batch)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per layout")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.model import load_tokenizer
    from rmjob_trainer.packing import collate_packed, packed_rewards
    from rmjob_trainer.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", hidden_size=128, num_layers=4, num_heads=4,
                                     max_position_embeddings=max(2048, args.prompt_tokens + args.answer_tokens))
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        if args.dataset == "long-answers":
            train = long_answers(args.pairs * args.steps, args.prompt_tokens, args.answer_tokens,
                                 model.config.vocab_size)
        else:
            (Path(tmp) / "data").mkdir()
            Dataset.from_list(DATASETS[args.dataset](args.pairs * args.steps, 0)).to_parquet(
                str(Path(tmp) / "data" / "train.parquet"))
            cfg = RewardConfig(dataset_mixer={str(Path(tmp) / "data" / "train.parquet"): 1.0},
                               model_name_or_path=str(model_dir), max_token_length=1024, num_evals=0)
            train, _ = build_datasets(cfg, load_tokenizer(cfg))
    batches = [train[i:i + args.pairs] for i in range(0, len(train) - args.pairs + 1, args.pairs)]

    def step(batch, shared: bool) -> torch.Tensor:
        chosen, rejected = batch["input_ids_chosen"], batch["input_ids_rejected"]
        collated = prefix_sharing.collate_shared(chosen, rejected) if shared else collate_packed(chosen + rejected)
        rewards = packed_rewards(model, collated)
        rewards.sum().backward()
        model.zero_grad(set_to_none=True)
        return rewards.detach()

    rule = prefix_sharing.block_mask_is_cheaper
    layouts = {"unshared": (False, rule), "block-mask": (True, lambda *_: True),
               "per-segment": (True, lambda *_: False), "rule": (True, rule)}
    reference = step(batches[0], False)
    for name, (shared, choice) in layouts.items():
        prefix_sharing.block_mask_is_cheaper = choice
        torch.testing.assert_close(step(batches[0], shared), reference, rtol=0, atol=1e-5)
    load_before = _load()
    times = {name: [] for name in layouts}
    cpu_times = {name: [] for name in layouts}  # this process's CPU seconds: less hit by the machine's load
    for batch in batches:  # interleaved, so that load drifts hit every layout alike
        for name, (shared, choice) in layouts.items():
            prefix_sharing.block_mask_is_cheaper = choice
            start, cpu_start = time.perf_counter(), time.process_time()
            step(batch, shared)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    prefix_sharing.block_mask_is_cheaper = rule
    shapes = [(shared, chosen_end - start - shared, end - chosen_end)
              for batch in batches
              for start, chosen_end, end, shared in prefix_sharing.collate_shared(
                  batch["input_ids_chosen"], batch["input_ids_rejected"])["shared_pairs"] if end > chosen_end]
    block_pairs = sum(rule(*shape) for shape in shapes)
    for name, values in times.items():
        print(f"{name:12s} median {1000 * statistics.median(values):7.1f} ms per step of {args.pairs} pairs, "
              f"CPU {1000 * statistics.median(cpu_times[name]):7.1f} ms ({len(values)} steps)")
    print("median prefix, chosen and rejected suffix tokens:", *map(statistics.median, zip(*shapes)))
    print(f"rule: block mask for {block_pairs} of {len(shapes)} pairs with a rejected suffix")
    print(f"load average {load_before} at the start, {_load()} at the end")


if __name__ == "__main__":
    main()
