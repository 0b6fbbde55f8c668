"""Push the trained reward model to the Hugging Face Hub (rank 0 only).

Same naming as open-instruct, so its links keep their shape
(``https://huggingface.co/vwxyzjn/reward_modeling__EleutherAI_pythia-1b-deduped/tree/reward_modeling__1__1725461002``):

- repository ``{entity}/{repo name}``: entity from ``--hf_entity`` or the token's user, name
  from ``--hf_repo_id`` or ``{exp_name}__{model_name_or_path with '/' -> '_'}``;
- revision: a branch named ``--hf_repo_revision`` or the run name, so every run of an
  experiment lands on its own branch of one repository;
- visibility: ``--hf_repo_private`` (open-instruct always pushes private; here it is a flag
  that defaults to private).

The model, tokenizer, chat template and metrics.json in ``output_dir`` go up in one commit
together with a generated model card. The token comes from ``HF_TOKEN`` only and is handed
straight to the client; it is never logged or written. ``HF_ENDPOINT`` is read at call time,
so a private Hub (or the test emulator) works without re-importing huggingface_hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData

from rmjob_trainer import UserInputError
from rmjob_trainer.config import RewardConfig

logger = logging.getLogger(__name__)

MODEL_CARD = "README.md"
# The hyper-parameters shown in the card's table; the full config follows in a <details> block.
CARD_HYPERPARAMETERS = (
    "learning_rate",
    "lr_scheduler_type",
    "warm_up_steps",
    "num_train_epochs",
    "total_episodes",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "eps",
    "max_token_length",
    "max_prompt_token_length",
    "chat_template",
    "mixed_precision",
    "seed",
)


def hub_token() -> str:
    """The write token from ``HF_TOKEN``; the CLI calls this before training, not after it."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserInputError("--push_to_hub needs a Hub write token in the HF_TOKEN environment variable")
    return token


def repo_name(cfg: RewardConfig) -> str:
    """The repository name without its entity: ``--hf_repo_id`` or open-instruct's default."""
    return cfg.hf_repo_id or f"{cfg.exp_name}__{cfg.model_name_or_path.replace('/', '_')}"


def push_to_hub(cfg: RewardConfig, output_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> dict[str, str]:
    """Create the repository and branch if needed and commit ``output_dir`` plus a model card.

    ``metrics`` are the final metrics; their ``run_name`` (the resumed run's name after a
    restart, not necessarily ``cfg.run_name``) names the branch unless ``--hf_repo_revision``
    does. Returns ``{"repo", "revision", "commit", "url"}`` for metrics.json, W&B and the job status.
    """
    token = hub_token()
    revision = cfg.hf_repo_revision or metrics["run_name"]

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    entity = cfg.hf_entity or api.whoami()["name"]
    repo_id = f"{entity}/{repo_name(cfg)}"

    api.create_repo(repo_id, private=cfg.hf_repo_private, exist_ok=True)
    api.create_branch(repo_id, branch=revision, exist_ok=True)
    card = model_card(cfg, repo_id, revision, metrics)
    operations = [
        CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        for path in _files_to_push(Path(output_dir))
    ]
    operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD, path_or_fileobj=card.encode()))
    commit = api.create_commit(
        repo_id,
        operations=operations,
        revision=revision,
        commit_message=f"Reward model {revision}",
        commit_description=f"Trained from {cfg.model_name_or_path} with rmjob.",
    )
    url = f"{api.endpoint}/{repo_id}/tree/{revision}"
    logger.info("Pushed the model to %s (commit %s)", url, commit.oid)
    return {"repo": repo_id, "revision": revision, "commit": commit.oid, "url": url}


def _files_to_push(output_dir: Path) -> list[Path]:
    """Top-level files only: what save_pretrained and the trainer write (model shards,
    tokenizer, chat template, metrics.json, plots). Sub-directories hold resumable
    checkpoints and W&B files, which do not belong in a model repository."""
    return sorted(
        p for p in output_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name != MODEL_CARD
    )


# --- model card --------------------------------------------------------------------------


def model_card(cfg: RewardConfig, repo_id: str, revision: str, metrics: Mapping[str, Any]) -> str:
    """The README.md pushed with the model: Hub metadata, then what it is, how it was
    trained, how well it did, and how to compute a reward with it."""
    base_model = cfg.model_name_or_path
    datasets = sorted({*(cfg.dataset_mixer or {}), *(cfg.dataset_eval_mixer or {})})
    metadata = ModelCardData(
        # Local paths are not Hub ids: the metadata only links what the Hub can resolve.
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=[d for d in datasets if _is_hub_id(d)] or None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["reward-model", "rmjob", cfg.exp_name],
    )
    sections = [
        f"---\n{metadata.to_yaml()}\n---",
        f"# {repo_id} ({revision})",
        "A Bradley-Terry reward model (`loss = -logsigmoid(r_chosen - r_rejected)`) trained from "
        f"`{base_model}` with rmjob, following open-instruct's "
        "reward-modeling recipe. It maps a conversation to one scalar: the higher, the more "
        "preferred the final assistant turn.",
        "## Training data\n\n" + "\n".join(f"- `{name}`" for name in datasets)
        + f"\n\nChat template: `{cfg.chat_template}` (saved with the tokenizer).",
        "## Hyper-parameters\n\n" + _table(
            ("Parameter", "Value"), [(k, f"`{getattr(cfg, k)}`") for k in CARD_HYPERPARAMETERS]
        )
        + "\n\n<details><summary>Full configuration</summary>\n\n```yaml\n"
        + yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=True)
        + "```\n\n</details>",
        "## Results\n\n" + (_table(("Metric", "Value"), _metric_rows(metrics)) or "No metrics recorded."),
        "## Usage\n\n" + _usage(repo_id, revision),
    ]
    return "\n\n".join(sections) + "\n"


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/"))


def _metric_rows(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Numeric leaves of the (possibly nested) metrics, eval/ first, as table rows."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _metric_rows(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((name, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return sorted(rows, key=lambda row: (not row[0].startswith("eval/"), row[0]))


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def _usage(repo_id: str, revision: str) -> str:
    # The reward is the score head's output at the last token: transformers' sequence
    # classification models pool at the last non-pad token, which is the last token of an
    # unpadded sequence because the trainer gives the tokenizer a pad token distinct from EOS.
    return f'''```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

repo_id, revision = {json.dumps(repo_id)}, {json.dumps(revision)}
tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision)
model = AutoModelForSequenceClassification.from_pretrained(repo_id, revision=revision).eval()

chat = [
    {{"role": "user", "content": "How do I teach kids to meditate?"}},
    {{"role": "assistant", "content": "Start with one minute of quiet breathing together."}},
]
inputs = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
with torch.no_grad():
    reward = model(**inputs).logits[0, 0].item()
print(f"reward: {{reward:.4f}}")
```'''
