"""``make demo``: train a reward model end to end on this machine's CPU in about a minute.

Builds a tiny random-init GPT-NeoX model (``models/demo-base``), trains it on the bundled
sentiment preference data and writes the reward model to ``models/demo-rm``; no network.

    python -m rmjob_trainer.demo [--output_dir DIR] [--base_dir DIR]
"""

from __future__ import annotations

import argparse
import os

from rmjob_trainer.config import RewardConfig
from rmjob_trainer.tiny import BUNDLED_DATASET_DIR, build_tiny_model


def demo_config(base_dir: str, output_dir: str) -> RewardConfig:
    return RewardConfig(
        dataset_mixer={str(BUNDLED_DATASET_DIR): 1.0},
        model_name_or_path=base_dir,
        chat_template="simple_chat",
        sanity_check=True,
        sanity_check_max_samples=400,  # 400 training pairs; the 300-pair test split is kept whole
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        num_evals=2,
        output_dir=output_dir,
        exp_name="demo",
        resume=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="models/demo-rm", help="where the reward model goes")
    parser.add_argument("--base_dir", default="models/demo-base", help="where the tiny base model goes")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rmjob_trainer.train import train  # heavy imports after argument parsing

    build_tiny_model(args.base_dir)
    metrics = train(demo_config(args.base_dir, args.output_dir))
    print(f"\neval accuracy {metrics['eval/rm/accuracy']:.3f} (loss {metrics['eval/rm/loss']:.4f}) "
          f"after {metrics['episode']} pairs")
    print(f"reward model written to {os.path.abspath(args.output_dir)}; load it with\n"
          f"  AutoModelForSequenceClassification.from_pretrained({args.output_dir!r})")


if __name__ == "__main__":
    main()
