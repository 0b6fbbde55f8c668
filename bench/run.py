"""`make bench`: rmjob's trainer against TRL's RewardTrainer, same model, data and settings.

    python bench/run.py [--pairs 2000] [--model-size small] [--device cpu] [--repeats 3] [--quick]

Builds a tiny random-init GPT-NeoX (rmjob_trainer.tiny) and deterministic preference pairs with
long-tailed lengths (bench/synthetic.py), tokenizes them once with rmjob's pipeline (TRL gets the very
same token ids), then runs each trainer ``--repeats`` times, alternating which goes first, each
run in its own subprocess (bench/worker.py). Reports medians of pairs/s, non-pad tokens/s, peak
RSS (and peak GPU memory on CUDA) and final eval accuracy, with rmjob/TRL ratios; writes
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

from synthetic import write_dataset

HERE = Path(__file__).resolve().parent
SIDES = ("rmjob", "trl")
MODEL_SIZES = {  # hidden_size, num_layers, num_heads of a GPT-NeoX (pythia) shaped model
    "tiny": (64, 2, 4),
    "small": (128, 4, 4),
    "base": (256, 6, 8),
}
METRICS = ("pairs_per_s", "tokens_per_s", "peak_rss_mb", "peak_gpu_mb", "eval_accuracy", "train_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2000, help="training pairs generated (before length filtering)")
    p.add_argument("--eval-pairs", type=int, default=512, help="evaluation pairs generated")
    p.add_argument("--model-size", choices=MODEL_SIZES, default="small", help="GPT-NeoX shape (see MODEL_SIZES)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both trainers run")
    p.add_argument("--repeats", type=int, default=3, help="runs per trainer (medians are reported)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step, both trainers")
    p.add_argument("--eval-batch-size", type=int, default=32, help="pairs per evaluation forward")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate, linear decay")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    p.add_argument("--max-length", type=int, default=512, help="pairs with a longer sequence are dropped")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in each run. 1 by default: on a machine shared with other "
                        "work, a team of N threads on N busy cores spends its time waiting at barriers and "
                        "the timings become noise; use the core count on a dedicated machine")
    p.add_argument("--seed", type=int, default=1, help="training seed of both trainers")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON and PNG go")
    p.add_argument("--quick", action="store_true",
                   help="harness check: 64 pairs, tiny model, one run each (numbers are meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.eval_pairs, args.model_size, args.repeats, args.batch_size = 64, 16, "tiny", 1, 8
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


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Model, data, rmjob's config, and the same pairs tokenized for TRL. Returns the run spec."""
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.model import load_tokenizer
    from rmjob_trainer.tiny import build_tiny_model

    hidden_size, num_layers, num_heads = MODEL_SIZES[args.model_size]
    model = build_tiny_model(work / "model", hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads)
    data = write_dataset(work / "data", args.pairs, args.eval_pairs)
    rmjob_config = dict(
        dataset_mixer={str(data): 1.0}, model_name_or_path=str(model), max_token_length=args.max_length,
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
                   "learning_rate": args.learning_rate, "epochs": args.epochs, "max_length": args.max_length,
                   "threads": args.threads, "seed": args.seed, "device": args.device},
        "data": length_stats(train, args.batch_size, args.seed) | {"eval_pairs": len(evaluation)},
    }


def length_stats(train, batch_size: int, seed: int) -> dict:
    """Sequence lengths, and how many tokens a padded trainer computes per real token when
    batching these pairs in random order (chosen and rejected padded to the batch's longest)."""
    import numpy as np

    chosen = np.array([len(s) for s in train["input_ids_chosen"]])
    rejected = np.array([len(s) for s in train["input_ids_rejected"]])
    lengths = np.concatenate([chosen, rejected])
    order = np.random.default_rng(seed).permutation(len(chosen))
    batches = (order[i:i + batch_size] for i in range(0, len(order), batch_size))
    padded = sum(2 * len(b) * max(chosen[b].max(), rejected[b].max()) for b in batches)
    return {"train_pairs": len(chosen), "tokens_per_pair": float(lengths.sum() / len(chosen)),
            "seq_len_median": float(np.median(lengths)), "seq_len_p90": float(np.percentile(lengths, 90)),
            "seq_len_max": int(lengths.max()), "padded_tokens_per_real_token": float(padded / lengths.sum())}


def run_one(side: str, spec: dict, work: Path, index: int, device: str) -> dict:
    run_dir = work / f"{side}-{index}"
    spec = dict(spec, output_dir=str(run_dir))
    spec["rmjob_config"] = dict(spec["rmjob_config"], output_dir=str(run_dir))
    spec_file, result_file = work / f"{side}-{index}.spec.json", work / f"{side}-{index}.result.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(HERE / "worker.py"), side, str(spec_file), str(result_file)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"{side} run {index} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(result_file.read_text())
    result["pairs_per_s"] = result["pairs"] / result["train_s"]
    result["tokens_per_s"] = result["pairs_per_s"] * spec["data"]["tokens_per_pair"]
    return result


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, dict]:
    summary = {side: {m: statistics.median(r[m] for r in rs) for m in METRICS if m in rs[0]}
               for side, rs in runs.items()}
    rm, trl = summary["rmjob"], summary["trl"]
    ratios = {"pairs_per_s": rm["pairs_per_s"] / trl["pairs_per_s"],
              "peak_rss": rm["peak_rss_mb"] / trl["peak_rss_mb"],
              "eval_accuracy_diff": rm["eval_accuracy"] - trl["eval_accuracy"]}
    if "peak_gpu_mb" in rm:
        ratios["peak_gpu"] = rm["peak_gpu_mb"] / trl["peak_gpu_mb"]
    return summary, ratios


def plot(runs: dict[str, list[dict]], summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pairs_per_s", "pairs / s"), ("peak_rss_mb", "peak RSS (MiB)"), ("eval_accuracy", "eval accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (metric, label) in zip(axes, panels):
        ax.bar(SIDES, [summary[s][metric] for s in SIDES], color=["tab:blue", "tab:gray"])
        for i, side in enumerate(SIDES):  # every repeat, to show the spread
            ax.plot([i] * len(runs[side]), [r[metric] for r in runs[side]], "k.", alpha=0.6)
        ax.set_title(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rmjob-bench-") as tmp:
        work = Path(tmp)
        spec = prepare(args, work)
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for index in range(args.repeats):
            # alternate the order so that background load drifts hit both sides alike
            for side in SIDES if index % 2 == 0 else SIDES[::-1]:
                runs[side].append(run_one(side, spec, work, index, args.device))
                print(f"{side:5s} run {index}: {runs[side][-1]['pairs_per_s']:.1f} pairs/s", flush=True)
    summary, ratios = summarize(runs)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    result = {"timestamp": stamp, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": machine(), "settings": vars(args) | {"out": str(args.out)},
              "model": dict(zip(("hidden_size", "num_layers", "num_heads"), MODEL_SIZES[args.model_size])),
              "data": spec["data"], "runs": runs, "summary": summary, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    plot(runs, summary, args.out / f"{stamp}.png",
         f"rmjob vs TRL RewardTrainer: {spec['data']['train_pairs']} pairs, {args.model_size} GPT-NeoX, "
         f"{args.device}, median of {args.repeats}")
    for side in SIDES:
        print(f"{side:5s} " + "  ".join(f"{k}={v:.4g}" for k, v in summary[side].items()))
    print("rmjob/trl: " + "  ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    print(f"wrote {args.out / stamp}.json and .png")
    return result


if __name__ == "__main__":
    main()
