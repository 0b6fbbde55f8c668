"""`make bench`: rmjob's trainer against TRL's RewardTrainer, same model, data and settings.

    python bench/run.py [--pairs 800] [--multi-turn-pairs 400] [--model-size small] [--device cpu]
                        [--repeats 2] [--datasets multi-turn single-turn] [--quick]

Builds a tiny random-init GPT-NeoX (rmjob_trainer.tiny) and, for each dataset of ``--datasets``
(bench/synthetic.py: ``multi-turn`` conversations, whose pairs share most of their tokens, and
``single-turn`` pairs, which share a short prompt), deterministic preference pairs with
long-tailed lengths, tokenized once with rmjob's pipeline (TRL gets the very same token ids).
Then runs each side of ``SIDES`` ``--repeats`` times per dataset, rotating which goes first,
each run in its own subprocess (bench/worker.py): TRL's RewardTrainer, rmjob padding-free, and
rmjob padding-free with prefix sharing. Reports medians of pairs/s, real (non-pad, each prefix
counted in both sequences) tokens/s, peak RSS (and peak GPU memory on CUDA) and final eval
accuracy, with ratios to TRL, and the fraction of tokens prefix sharing saves; writes
``<out>/<timestamp>.json`` and ``<timestamp>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import DATASETS, write_dataset

HERE = Path(__file__).resolve().parent
# side -> rmjob's prefix_sharing (None: TRL)
SIDES = {"trl": None, "rmjob": False, "rmjob-shared": True}
MODEL_SIZES = {  # hidden_size, num_layers, num_heads of a GPT-NeoX (pythia) shaped model
    "tiny": (64, 2, 4),
    "small": (128, 4, 4),
    "base": (256, 6, 8),
}
METRICS = ("pairs_per_s", "tokens_per_s", "peak_rss_mb", "peak_gpu_mb", "eval_accuracy", "train_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=800,
                   help="single-turn training pairs generated (before length filtering)")
    p.add_argument("--multi-turn-pairs", type=int, default=400,
                   help="multi-turn training pairs generated (before length filtering)")
    p.add_argument("--eval-pairs", type=int, default=200, help="evaluation pairs generated, per dataset")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), help="which datasets")
    p.add_argument("--model-size", choices=MODEL_SIZES, default="small", help="GPT-NeoX shape (see MODEL_SIZES)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both trainers run")
    p.add_argument("--repeats", type=int, default=2, help="runs per trainer and dataset (medians are reported)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step, both trainers")
    p.add_argument("--eval-batch-size", type=int, default=32, help="pairs per evaluation forward")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate, linear decay")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    p.add_argument("--max-length", type=int, default=512,
                   help="single-turn pairs with a longer sequence are dropped")
    p.add_argument("--multi-turn-max-length", type=int, default=1024,
                   help="multi-turn pairs with a longer sequence are dropped")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in each run. 1 by default: on a machine shared with other "
                        "work, a team of N threads on N busy cores spends its time waiting at barriers and "
                        "the timings become noise; use the core count on a dedicated machine")
    p.add_argument("--seed", type=int, default=1, help="training seed of both trainers")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON and PNG go")
    p.add_argument("--quick", action="store_true",
                   help="harness check: 32 pairs per dataset, tiny model, one run each (numbers are meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs = args.multi_turn_pairs = 32
        args.eval_pairs, args.model_size, args.repeats, args.batch_size = 16, "tiny", 1, 8
    return args


def machine() -> dict:
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def prepare(args: argparse.Namespace, work: Path, model: Path, dataset: str) -> dict:
    """``dataset``'s pairs, rmjob's config, and the same pairs tokenized for TRL. Returns the run spec."""
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.model import load_tokenizer

    pairs, max_length = ((args.multi_turn_pairs, args.multi_turn_max_length) if dataset == "multi-turn"
                         else (args.pairs, args.max_length))
    data = write_dataset(work / "data", pairs, args.eval_pairs, shape=dataset)
    rmjob_config = dict(
        dataset_mixer={str(data): 1.0}, model_name_or_path=str(model), max_token_length=max_length,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate, num_train_epochs=args.epochs, num_evals=1, seed=args.seed,
        mixed_precision="no", padding_free=True, resume=False,
    )
    cfg = RewardConfig(**rmjob_config)
    train, evaluation = build_datasets(cfg, load_tokenizer(cfg))
    columns = {"input_ids_chosen": "chosen_ids", "input_ids_rejected": "rejected_ids"}
    for name, ds in (("train", train), ("eval", evaluation)):
        ds.select_columns(list(columns)).rename_columns(columns).save_to_disk(str(work / "tokenized" / name))
    return {
        "model": str(model), "tokenized": str(work / "tokenized"), "rmjob_config": rmjob_config,
        "shared": {"batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                   "learning_rate": args.learning_rate, "epochs": args.epochs, "max_length": max_length,
                   "threads": args.threads, "seed": args.seed, "device": args.device},
        "data": length_stats(train, args.batch_size, args.seed) | {"eval_pairs": len(evaluation)},
    }


def length_stats(train, batch_size: int, seed: int) -> dict:
    """Sequence lengths; how many tokens a padded trainer computes per real token when batching
    these pairs in random order (chosen and rejected padded to the batch's longest); and the
    fraction of real tokens prefix sharing computes once instead of twice."""
    import numpy as np

    from rmjob_trainer.prefix_sharing import common_prefix_length

    chosen = np.array([len(s) for s in train["input_ids_chosen"]])
    rejected = np.array([len(s) for s in train["input_ids_rejected"]])
    shared = np.array([common_prefix_length(c, r) for c, r in zip(train["input_ids_chosen"],
                                                                    train["input_ids_rejected"])])
    lengths = np.concatenate([chosen, rejected])
    order = np.random.default_rng(seed).permutation(len(chosen))
    batches = (order[i:i + batch_size] for i in range(0, len(order), batch_size))
    padded = sum(2 * len(b) * max(chosen[b].max(), rejected[b].max()) for b in batches)
    return {"train_pairs": len(chosen), "tokens_per_pair": float(lengths.sum() / len(chosen)),
            "seq_len_median": float(np.median(lengths)), "seq_len_p90": float(np.percentile(lengths, 90)),
            "seq_len_max": int(lengths.max()), "padded_tokens_per_real_token": float(padded / lengths.sum()),
            "shared_prefix_median": float(np.median(shared)),
            "prefix_sharing_tokens_saved": float(shared.sum() / lengths.sum())}


def run_one(side: str, spec: dict, work: Path, index: int, device: str) -> dict:
    run_dir = work / f"{side}-{index}"
    spec = dict(spec, output_dir=str(run_dir))
    spec["rmjob_config"] = dict(spec["rmjob_config"], output_dir=str(run_dir), prefix_sharing=bool(SIDES[side]))
    spec_file, result_file = work / f"{side}-{index}.spec.json", work / f"{side}-{index}.result.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    worker_side = "trl" if SIDES[side] is None else "rmjob"
    proc = subprocess.run([sys.executable, str(HERE / "worker.py"), worker_side, str(spec_file), str(result_file)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} run {index} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(result_file.read_text())
    result["pairs_per_s"] = result["pairs"] / result["train_s"]
    result["tokens_per_s"] = result["pairs_per_s"] * spec["data"]["tokens_per_pair"]
    return result


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Medians per side, and each rmjob side's ratios to TRL."""
    summary = {side: {m: statistics.median(r[m] for r in rs) for m in METRICS if m in rs[0]}
               for side, rs in runs.items()}
    trl = summary["trl"]
    ratios = {}
    for side in (s for s in runs if s != "trl"):
        rm = summary[side]
        ratios[side] = {"pairs_per_s": rm["pairs_per_s"] / trl["pairs_per_s"],
                        "peak_rss": rm["peak_rss_mb"] / trl["peak_rss_mb"],
                        "eval_accuracy_diff": rm["eval_accuracy"] - trl["eval_accuracy"]}
        if "peak_gpu_mb" in rm:
            ratios[side]["peak_gpu"] = rm["peak_gpu_mb"] / trl["peak_gpu_mb"]
    return summary, ratios


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """One row of panels per dataset: pairs/s, peak RSS, eval accuracy; a dot per repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pairs_per_s", "pairs / s"), ("peak_rss_mb", "peak RSS (MiB)"), ("eval_accuracy", "eval accuracy")]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(4.4 * len(panels), 3.4 * len(results)),
                             squeeze=False)
    for row, (dataset, result) in zip(axes, results.items()):
        sides = list(result["runs"])
        for ax, (metric, label) in zip(row, panels):
            ax.bar(sides, [result["summary"][s][metric] for s in sides],
                   color=["tab:gray", "tab:blue", "tab:green"][:len(sides)])
            for i, side in enumerate(sides):
                ax.plot([i] * len(result["runs"][side]), [r[metric] for r in result["runs"][side]], "k.", alpha=0.6)
            ax.set_title(f"{dataset}: {label}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from rmjob_trainer.tiny import build_tiny_model

    args = parse_args(argv)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="rmjob-bench-") as tmp:
        hidden_size, num_layers, num_heads = MODEL_SIZES[args.model_size]
        model = build_tiny_model(Path(tmp) / "model", hidden_size=hidden_size, num_layers=num_layers,
                                 num_heads=num_heads)
        for dataset in args.datasets:
            work = Path(tmp) / dataset
            spec = prepare(args, work, model, dataset)
            runs: dict[str, list[dict]] = {side: [] for side in SIDES}
            for index in range(args.repeats):
                # rotate the order so that background load drifts hit every side alike
                order = list(SIDES)[index % len(SIDES):] + list(SIDES)[:index % len(SIDES)]
                for side in order:
                    runs[side].append(run_one(side, spec, work, index, args.device))
                    print(f"{dataset} {side:12s} run {index}: {runs[side][-1]['pairs_per_s']:.1f} pairs/s", flush=True)
            summary, ratios = summarize(runs)
            results[dataset] = {"data": spec["data"], "runs": runs, "summary": summary, "ratios": ratios}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    result = {"timestamp": stamp, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": machine(), "load_average": {"before": load_before, "after": os.getloadavg()},
              "settings": vars(args) | {"out": str(args.out)},
              "model": dict(zip(("hidden_size", "num_layers", "num_heads"), MODEL_SIZES[args.model_size])),
              "datasets": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    plot(results, args.out / f"{stamp}.png",
         f"rmjob vs TRL RewardTrainer: {args.model_size} GPT-NeoX, {args.device}, median of {args.repeats}")
    for dataset, r in results.items():
        print(f"{dataset}: {r['data']['train_pairs']} pairs, {r['data']['tokens_per_pair']:.0f} tokens/pair, "
              f"prefix sharing saves {r['data']['prefix_sharing_tokens_saved']:.1%} of tokens")
        for side, summary in r["summary"].items():
            print(f"  {side:12s} " + "  ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        for side, ratios in r["ratios"].items():
            print(f"  {side}/trl: " + "  ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    print(f"load average before/after: {load_before} / {result['load_average']['after']}")
    print(f"wrote {args.out / stamp}.json and .png")
    return result


if __name__ == "__main__":
    main()
