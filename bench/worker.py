"""One benchmark run in its own process, so that its peak RSS is its own.

    python bench/worker.py {rmjob,trl} SPEC.json RESULT.json

SPEC (written by run.py) names the model, the data and the shared hyper-parameters. Both sides
train on the same tokenized pairs and evaluate once at the end on the same eval pairs. ``train_s``
is the wall time of each trainer's whole job through its public API: model loading, training,
the final evaluation and saving the model. rmjob's also includes reading and tokenizing the data
(``train(cfg)`` does it all); TRL gets the pairs already tokenized, so the comparison is, if
anything, tilted towards TRL.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def peak_memory() -> dict:
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def run_rmjob(spec: dict) -> dict:
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.train import train

    metrics = train(RewardConfig(**spec["rmjob_config"]))
    return {"pairs": metrics["episode"], "eval_accuracy": metrics["eval/rm/accuracy"]}


def run_trl(spec: dict) -> dict:
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    shared = spec["shared"]
    train_dataset = load_from_disk(spec["tokenized"] + "/train")
    eval_dataset = load_from_disk(spec["tokenized"] + "/eval")
    args = RewardConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=shared["batch_size"],
        # TRL's eval accuracy is the mean of its batches' accuracies, so a short last batch would
        # weigh as much as a full one; in one batch it is the fraction of pairs ranked right, as rmjob's
        per_device_eval_batch_size=len(eval_dataset),
        num_train_epochs=shared["epochs"],
        learning_rate=shared["learning_rate"],
        # rmjob's (open-instruct's) optimisation: AdamW eps 1e-5, linear decay, no warm-up,
        # no weight decay, no gradient clipping
        adam_epsilon=1e-5,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_length=shared["max_length"],
        # TRL defaults to bf16 and gradient checkpointing; rmjob runs neither here
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=shared["device"] == "cpu",
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=shared["seed"],
    )
    trainer = RewardTrainer(model=spec["model"], args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            processing_class=AutoTokenizer.from_pretrained(spec["model"]))
    trainer.train()
    eval_metrics = trainer.evaluate()
    trainer.save_model(spec["output_dir"])
    return {"pairs": len(train_dataset) * shared["epochs"], "eval_accuracy": eval_metrics["eval_accuracy"]}


def import_trainer(side: str) -> None:
    """Import each side's trainer before the clock starts: start-up time is not training time."""
    if side == "rmjob":
        import rmjob_trainer.data  # noqa: F401
        import rmjob_trainer.train  # noqa: F401
    else:
        import trl.trainer.reward_trainer  # noqa: F401


def main() -> None:
    side, spec_path, result_path = sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["shared"]["threads"])
    run = {"rmjob": run_rmjob, "trl": run_trl}[side]
    import_trainer(side)
    start = time.perf_counter()
    result = run(spec)
    result.update(train_s=time.perf_counter() - start, **peak_memory())
    Path(result_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
