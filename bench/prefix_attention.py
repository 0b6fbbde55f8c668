"""Which CPU attention layout prefix sharing uses: one SDPA call per pair with a block mask, or
SDPA per segment. Times forward + backward of training steps on a synthetic dataset.

    python bench/prefix_attention.py [--dataset multi-turn] [--pairs 16] [--steps 8] [--threads 1]

Layouts (same rewards, checked before timing):
* ``unshared``: padding-free packing, each sequence its own SDPA call (prefix computed twice);
* ``block-mask``: what rmjob_trainer.prefix_sharing ships: one SDPA call per pair over
  ``[P C R]``, the mask hiding ``C`` from ``R`` (the masked ``R x C`` scores are computed too);
* ``per-segment``: ``[P C]`` with ``is_causal``, then ``R`` against the keys ``[P R]`` (copied
  together) with a causal mask aligned to the last key: no masked scores, twice the calls.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rmjob_trainer import prefix_sharing
from synthetic import DATASETS


def per_segment_attention(module, query, key, value, layout, sliding_window=None, **kwargs):
    """Two SDPA calls per pair (no sliding windows: the benchmark's GPT-NeoX has none)."""
    outputs = []
    for start, chosen_end, end, shared in layout.pairs:
        output, _ = sdpa_attention_forward(module, query[:, :, start:chosen_end], key[:, :, start:chosen_end],
                                           value[:, :, start:chosen_end], None, **kwargs)
        outputs.append(output)
        if end > chosen_end:
            keys = torch.cat([key[:, :, start:start + shared], key[:, :, chosen_end:end]], 2)
            values = torch.cat([value[:, :, start:start + shared], value[:, :, chosen_end:end]], 2)
            rows, columns = torch.arange(shared, shared + end - chosen_end), torch.arange(keys.shape[2])
            mask = rows[:, None] >= columns[None, :]
            output, _ = sdpa_attention_forward(module, query[:, :, chosen_end:end], keys, values, mask[None, None],
                                               **kwargs)
            outputs.append(output)
    return torch.cat(outputs, 1), None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="multi-turn")
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
        model_dir = build_tiny_model(Path(tmp) / "model", hidden_size=128, num_layers=4, num_heads=4)
        (Path(tmp) / "data").mkdir()
        Dataset.from_list(DATASETS[args.dataset](args.pairs * args.steps, 0)).to_parquet(
            str(Path(tmp) / "data" / "train.parquet"))
        cfg = RewardConfig(dataset_mixer={str(Path(tmp) / "data" / "train.parquet"): 1.0},
                           model_name_or_path=str(model_dir), max_token_length=1024, num_evals=0)
        train, _ = build_datasets(cfg, load_tokenizer(cfg))
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    batches = [train[i:i + args.pairs] for i in range(0, len(train) - args.pairs + 1, args.pairs)]

    def step(batch, shared: bool) -> torch.Tensor:
        chosen, rejected = batch["input_ids_chosen"], batch["input_ids_rejected"]
        collated = prefix_sharing.collate_shared(chosen, rejected) if shared else collate_packed(chosen + rejected)
        rewards = packed_rewards(model, collated)
        rewards.sum().backward()
        model.zero_grad(set_to_none=True)
        return rewards.detach()

    shipped = prefix_sharing.shared_prefix_attention
    layouts = {"unshared": (False, shipped), "block-mask": (True, shipped),
               "per-segment": (True, per_segment_attention)}
    reference = step(batches[0], False)
    for name, (shared, attention) in layouts.items():
        prefix_sharing.shared_prefix_attention = attention
        torch.testing.assert_close(step(batches[0], shared), reference, rtol=0, atol=1e-5)
    times = {name: [] for name in layouts}
    for batch in batches:  # interleaved, so that load drifts hit every layout alike
        for name, (shared, attention) in layouts.items():
            prefix_sharing.shared_prefix_attention = attention
            start = time.perf_counter()
            step(batch, shared)
            times[name].append(time.perf_counter() - start)
    prefix_sharing.shared_prefix_attention = shipped
    for name, values in times.items():
        print(f"{name:12s} median {1000 * statistics.median(values):7.1f} ms per step of {args.pairs} pairs "
              f"({len(values)} steps)")


if __name__ == "__main__":
    main()
