"""The trainer's configuration: one dataclass, one help string per field.

This module is the single source of truth for every key the trainer accepts, on the
command line (``--learning_rate 3e-6``), in a ``--config`` YAML file, and in the
``spec.trainer`` section of a RewardModelJob (camelCase there; the operator generates
that part of the CRD schema from these fields). It must stay importable without torch:
the operator image imports it.

Field names and defaults follow open-instruct's ``reward_modeling.py`` (``Args``,
``DatasetConfig`` and ``ModelConfig``), so its command lines work unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

LR_SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
INVALID_ROW_POLICIES = ("drop", "error")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RewardConfig:
    # --- data -------------------------------------------------------------------------
    dataset_mixer: Optional[dict[str, float]] = field(
        default=None,
        metadata=_help(
            "Training datasets and how much of each to use, as a JSON object: "
            '{"name-or-path": fraction-or-count}. A value in (0, 1] is a fraction of the '
            "split; an integer > 1 is an absolute number of rows. Sources: Hub ids, local "
            "directories in the Hub layout, .json/.jsonl/.parquet files, save_to_disk folders.",
            required=True,
        ),
    )
    dataset_train_splits: list[str] = field(
        default_factory=lambda: ["train"],
        metadata=_help("Split to read from each dataset of --dataset_mixer, in the same order "
                       "(one value applies to all)."),
    )
    dataset_eval_mixer: Optional[dict[str, float]] = field(
        default=None,
        metadata=_help("Evaluation datasets, same format as --dataset_mixer. Defaults to "
                       "--dataset_mixer."),
    )
    dataset_eval_splits: list[str] = field(
        default_factory=lambda: ["test"],
        metadata=_help("Split to read from each dataset of --dataset_eval_mixer."),
    )
    chat_template: str = field(
        default="simple_chat",
        metadata=_help("Name of a template in CHAT_TEMPLATES (simple_concat_with_space, "
                       "simple_chat, tulu, zephyr, ...) or 'tokenizer' to use the tokenizer's own."),
    )
    max_token_length: Optional[int] = field(
        default=None,
        metadata=_help("Drop pairs whose chosen or rejected sequence is longer than this many tokens.",
                       minimum=1),
    )
    max_prompt_token_length: Optional[int] = field(
        default=None,
        metadata=_help("Drop pairs whose prompt is longer than this many tokens.", minimum=1),
    )
    sanity_check: bool = field(
        default=False,
        metadata=_help("Debug mode: use only --sanity_check_max_samples rows of each split."),
    )
    sanity_check_max_samples: int = field(
        default=100, metadata=_help("Rows kept per split with --sanity_check.", minimum=1)
    )
    invalid_rows: Literal["drop", "error"] = field(
        default="drop",
        metadata=_help("What to do with rows whose chosen/rejected is missing, empty or "
                       "ill-typed: 'drop' them (each reported by index) or stop with an 'error'."),
    )
    num_proc: Optional[int] = field(
        default=None,
        metadata=_help("Processes for tokenization (default: number of CPUs, at most 8).", minimum=1),
    )

    # --- model ------------------------------------------------------------------------
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata=_help("Hub id or local path of the base model.", required=True),
    )
    model_revision: Optional[str] = field(
        default=None, metadata=_help("Branch, tag or commit of the base model.")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow custom modelling code from the model repository.")
    )
    attn_implementation: Optional[str] = field(
        default=None,
        metadata=_help("Attention kernel: eager, sdpa or flash_attention_2 (default: the "
                       "fastest available)."),
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto",
        metadata=_help("Autocast precision. 'auto' uses bf16 where the hardware supports it."),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Trade compute for memory by recomputing activations.")
    )
    resize_token_embeddings: bool = field(
        default=True,
        metadata=_help("Resize the embedding matrix when a pad token is added to the tokenizer."),
    )
    padding_free: bool = field(
        default=True,
        metadata=_help("Pack sequences without padding (per-sequence position ids). Same "
                       "rewards as padded batches, less wasted compute."),
    )
    prefix_sharing: bool = field(
        default=True,
        metadata=_help("Compute each pair's shared prefix (the longest common prefix of its chosen and "
                       "rejected token ids, usually the prompt) once, in padding-free batches; the "
                       "rejected suffix attends to the chosen sequence's copy of it. Same rewards and "
                       "gradients, fewer tokens (with --lora_dropout above 0 both sequences share the "
                       "prefix's dropout mask). No effect on padded batches (--padding_free false)."),
    )
    use_peft: bool = field(
        default=False,
        metadata=_help("Train LoRA adapters (peft) instead of all weights; the score head is always "
                       "trained in full. output_dir gets the merged model, output_dir/adapter the "
                       "adapter. Single process, DDP and ZeRO-2 (not ZeRO-3)."),
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank (with --use_peft).", minimum=1))
    lora_alpha: int = field(
        default=32, metadata=_help("LoRA scaling alpha; updates are scaled by alpha / r (with --use_peft).",
                                   minimum=1)
    )
    lora_dropout: float = field(
        default=0.0,
        metadata=_help("Dropout on the LoRA path (with --use_peft). Default 0, as every other dropout of "
                       "the reward model (TRL's default is 0.05).", minimum=0),
    )
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata=_help("Module names (or 'all-linear') that get LoRA adapters (with --use_peft; "
                       "default: peft's choice for the architecture, e.g. q_proj v_proj for Llama)."),
    )
    eval_benchmark: Optional[str] = field(
        default=None,
        metadata=_help("RewardBench-style file (v1 or v2 format, see docs/evaluation.md) scored at each "
                       "evaluation and at the end: results in metrics.json, log.jsonl, W&B and "
                       "output_dir/benchmark.json + benchmark.png."),
    )

    # --- optimisation -----------------------------------------------------------------
    learning_rate: float = field(default=2e-5, metadata=_help("Peak learning rate.", exclusiveMinimum=0))
    eps: float = field(default=1e-5, metadata=_help("AdamW epsilon.", exclusiveMinimum=0))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay.", minimum=0))
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = field(default="linear", metadata=_help("Learning-rate schedule."))
    warm_up_steps: int = field(default=0, metadata=_help("Warm-up optimizer steps.", minimum=0))
    num_train_epochs: int = field(default=1, metadata=_help("Passes over the training data.", minimum=1))
    per_device_train_batch_size: int = field(
        default=1, metadata=_help("Preference pairs per device per micro-step.", minimum=1)
    )
    per_device_eval_batch_size: int = field(
        default=1, metadata=_help("Preference pairs per device per evaluation step.", minimum=1)
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("Micro-steps accumulated per optimizer step.", minimum=1)
    )
    total_episodes: Optional[int] = field(
        default=None,
        metadata=_help("Total training pairs to consume (default: epochs x dataset size).", minimum=1),
    )
    num_evals: int = field(
        default=1, metadata=_help("Evaluations spread evenly over training (0: none).", minimum=0)
    )
    center_rewards_coefficient: Optional[float] = field(
        default=None,
        metadata=_help("Reward centering (TRL's option, https://huggingface.co/papers/2312.09244 Eq. 2): "
                       "adds coefficient x mean((r_chosen + r_rejected)^2) to the loss, pulling rewards "
                       "towards mean zero. Recommended value: 0.01 (default: off).", minimum=0),
    )

    # --- run, checkpoints, outputs ----------------------------------------------------
    exp_name: str = field(default="reward_modeling", metadata=_help("Experiment name; prefix of the run name."))
    seed: int = field(default=1, metadata=_help("Random seed."))
    run_name: Optional[str] = field(
        default=None, metadata=_help("Run name (default: {exp_name}__{seed}__{unix_time}).")
    )
    output_dir: str = field(default="output", metadata=_help("Where the model, checkpoints and metrics.json go."))
    checkpointing_steps: Optional[int] = field(
        default=None,
        metadata=_help("Save a resumable checkpoint every N optimizer steps (default: never).", minimum=1),
    )
    checkpoints_total_limit: int = field(
        default=2, metadata=_help("Checkpoints kept; older ones are deleted.", minimum=1)
    )
    resume: bool = field(
        default=True,
        metadata=_help("Continue from the newest checkpoint in output_dir when one exists."),
    )
    deepspeed: Optional[str] = field(
        default=None,
        metadata=_help("DeepSpeed config: a DeepSpeed JSON file or an accelerate config YAML "
                       "(configs/ds_configs/deepspeed_zero{2,3}.yaml)."),
    )

    # --- tracking and Hub -------------------------------------------------------------
    with_tracking: bool = field(default=False, metadata=_help("Log to Weights & Biases."))
    wandb_project_name: str = field(default="open_instruct_internal", metadata=_help("W&B project."))
    wandb_entity: Optional[str] = field(default=None, metadata=_help("W&B entity (team or user)."))
    push_to_hub: bool = field(default=False, metadata=_help("Push the trained model to the Hugging Face Hub."))
    hf_entity: Optional[str] = field(
        default=None, metadata=_help("Hub user or organisation (default: the token's user).")
    )
    hf_repo_id: Optional[str] = field(
        default=None, metadata=_help("Hub repository name (default: {exp_name}__{model_name}).")
    )
    hf_repo_revision: Optional[str] = field(
        default=None, metadata=_help("Hub branch to push to (default: the run name).")
    )
    hf_repo_private: bool = field(default=True, metadata=_help("Create the Hub repository as private."))


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(RewardConfig)}
