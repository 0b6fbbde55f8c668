"""Which CPU attention layout prefix sharing uses: one SDPA call per pair with a block mask, or
SDPA per segment (the rejected suffix masked or causal), and the rule that picks one per pair.
Times forward + backward of training steps on a synthetic dataset.

    python bench/prefix_attention.py [--dataset multi-turn] [--pairs 16] [--steps 8] [--threads 1]
    python bench/prefix_attention.py --dataset long-answers [--prompt-tokens 32] [--answer-tokens 1024]
    python bench/prefix_attention.py --layouts unshared rule  # a subset: less CPU time

``long-answers``: random token ids, a prompt and two answers (every pair alike). A short prompt
with long answers is the shape in which the block mask's masked ``R x C`` scores outweigh
everything it saves; a long prompt with short answers (``--prompt-tokens 2000 --answer-tokens
40``) the one in which the per-segment ``[P C]`` call's ``is_causal`` (about half its scores
skipped) does.

Layouts (same rewards, checked before timing):
* ``unshared``: padding-free packing, each sequence its own SDPA call (prefix computed twice);
* ``block-mask``: every pair one SDPA call over ``[P C R]``, the mask hiding ``C`` from ``R``
  (the masked scores, ``R x C`` among them, are computed too);
* ``per-segment``: every pair ``[P C]`` with ``is_causal``, then ``R`` against the keys
  ``[P R]`` (gathered) with a causal mask aligned to the last key: no masked ``R x C`` scores,
  twice the calls;
* ``per-segment-causal``: as ``per-segment``, but ``R``'s call is over the queries ``[P R]``
  with ``is_causal``, ``P``'s rows dropped: the attention of unshared packing;
* ``rule``: what rmjob_trainer.prefix_sharing ships: each pair's layout chosen by
  ``prefix_sharing.block_mask_is_cheaper`` and ``prefix_sharing.causal_suffix_is_cheaper``.
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


# layout: (shared, block_mask_is_cheaper, causal_suffix_is_cheaper), None: the shipped rule's
LAYOUTS = {"unshared": (False, None, None), "block-mask": (True, True, False), "per-segment": (True, False, False),
           "per-segment-causal": (True, False, True), "rule": (True, None, None)}


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
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                   help="the layouts to time (each checked against unshared first)")
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

    block_rule, causal_rule = prefix_sharing.block_mask_is_cheaper, prefix_sharing.causal_suffix_is_cheaper

    def use(layout: str) -> bool:
        """Sets the layout's choice functions; whether it shares prefixes."""
        shared, block_mask, causal_suffix = LAYOUTS[layout]
        prefix_sharing.block_mask_is_cheaper = block_rule if block_mask is None else lambda *_: block_mask
        prefix_sharing.causal_suffix_is_cheaper = causal_rule if causal_suffix is None else lambda *_: causal_suffix
        return shared

    reference = step(batches[0], False)
    for name in args.layouts:
        torch.testing.assert_close(step(batches[0], use(name)), reference, rtol=0, atol=1e-5)
    load_before = _load()
    times = {name: [] for name in args.layouts}
    cpu_times = {name: [] for name in args.layouts}  # this process's CPU seconds: less hit by the machine's load
    for batch in batches:  # interleaved, so that load drifts hit every layout alike
        for name in args.layouts:
            shared = use(name)
            start, cpu_start = time.perf_counter(), time.process_time()
            step(batch, shared)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    use("rule")
    shapes = [(shared, chosen_end - start - shared, end - chosen_end)
              for batch in batches
              for start, chosen_end, end, shared in prefix_sharing.collate_shared(
                  batch["input_ids_chosen"], batch["input_ids_rejected"])["shared_pairs"] if end > chosen_end]
    block_pairs = sum(block_rule(*shape) for shape in shapes)
    causal_pairs = sum(not block_rule(p, c, r) and causal_rule(p, r) for p, c, r in shapes)
    for name, values in times.items():
        print(f"{name:18s} median {1000 * statistics.median(values):7.1f} ms per step of {args.pairs} pairs, "
              f"CPU {1000 * statistics.median(cpu_times[name]):7.1f} ms ({len(values)} steps)")
    print("median prefix, chosen and rejected suffix tokens:", *map(statistics.median, zip(*shapes)))
    print(f"rule, of {len(shapes)} pairs with a rejected suffix: block mask for {block_pairs}, "
          f"per segment with a causal suffix for {causal_pairs}, with a masked suffix for the rest")
    print(f"load average {load_before} at the start, {_load()} at the end")


if __name__ == "__main__":
    main()
