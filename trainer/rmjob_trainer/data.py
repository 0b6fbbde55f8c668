"""Preference data: loading and mixing datasets, validating rows, tokenizing, filtering.

Follows open-instruct's ``dataset_processor.py`` (``CHAT_TEMPLATES``,
``PreferenceDatasetProcessor``, ``visualize_token``) and its dataset-mixer semantics, with
these differences:

* ``filter`` checks ``max_prompt_token_length`` AND ``max_token_length`` on both chosen and
  rejected (open-instruct's nested conditional skipped the length check whenever a prompt
  limit was set, and the rejected check whenever ``max_token_length`` was set);
* rows whose ``chosen``/``rejected`` is missing, empty or ill-typed are reported by index and
  dropped (or rejected with ``--invalid_rows error``) instead of crashing tokenization;
* plain-string ``chosen``/``rejected`` with a ``prompt`` column, and trl's explicit-prompt
  format (``prompt`` as a message list), are accepted besides trl-style message lists;
* a mixer value of ``1`` means the whole split (see ``cli._to_mixer``);
* without ``--dataset_eval_mixer`` the eval set is each training dataset's whole
  ``--dataset_eval_splits`` split, and never its training rows (see ``eval_mixer``).

Subsets are the first rows of each split, as in open-instruct (no shuffling here: the training
loop shuffles with ``--seed``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from datasets import (
    Dataset,
    DatasetDict,
    Features,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.exceptions import DatasetsError
from datasets.fingerprint import Hasher

from rmjob_trainer import ConfigError, DataError
from rmjob_trainer.chat_templates import CHAT_TEMPLATES, TOKENIZER_TEMPLATE

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATES",
    "CHOSEN_KEY",
    "INPUT_IDS_CHOSEN_KEY",
    "INPUT_IDS_PROMPT_KEY",
    "INPUT_IDS_REJECTED_KEY",
    "REJECTED_KEY",
    "DataError",
    "PreferenceDatasetProcessor",
    "build_datasets",
    "load_mixture",
    "load_source",
    "set_chat_template",
    "visualize_token",
]

CHOSEN_KEY = "chosen"
REJECTED_KEY = "rejected"
PROMPT_KEY = "prompt"
INPUT_IDS_CHOSEN_KEY = "input_ids_chosen"
INPUT_IDS_REJECTED_KEY = "input_ids_rejected"
INPUT_IDS_PROMPT_KEY = "input_ids_prompt"
TOKEN_LENGTH_FEATURES = (INPUT_IDS_CHOSEN_KEY, INPUT_IDS_REJECTED_KEY, INPUT_IDS_PROMPT_KEY)

# open-instruct's throughput estimates, used to avoid spawning workers for small datasets.
APPLY_CHAT_TEMPLATE_EXAMPLES_PER_SECOND_PER_CPU = 400
FILTER_EXAMPLES_PER_SECOND_PER_CPU = 1130

MESSAGES = List({"content": Value("string"), "role": Value("string")})
_NORMALIZED_FEATURES = Features({CHOSEN_KEY: MESSAGES, REJECTED_KEY: MESSAGES, "__invalid__": Value("string")})
_INVALID_KEY = "__invalid__"
_MAX_REPORTED_ROWS = 20
# Bump when the tokenization below changes, so cached results from older code are not reused.
_TOKENIZE_VERSION = "1"

T = TypeVar("T", Dataset, DatasetDict)


def get_num_proc(dataset_len: int, num_available_cpus: int, examples_per_second_per_cpu: int) -> int:
    """As many workers as the dataset needs (about one second of work each), at most the CPUs."""
    return max(1, min(dataset_len // examples_per_second_per_cpu, num_available_cpus))


def _each_split(dataset: T, fn: Callable[[Dataset, str], Dataset]) -> T:
    if isinstance(dataset, DatasetDict):
        return DatasetDict({split: fn(ds, split) for split, ds in dataset.items()})
    return fn(dataset, "dataset")


def set_chat_template(tokenizer, name: str) -> None:
    """Install ``CHAT_TEMPLATES[name]`` on the tokenizer ('tokenizer': keep its own)."""
    if name == TOKENIZER_TEMPLATE:
        if not tokenizer.chat_template:
            raise ConfigError(
                "--chat_template: 'tokenizer' asks for the tokenizer's own chat template, but it "
                f"has none; pick one of {', '.join(CHAT_TEMPLATES)}"
            )
        return
    if name not in CHAT_TEMPLATES:
        raise ConfigError(f"--chat_template: unknown template {name!r} (choose from {', '.join(CHAT_TEMPLATES)})")
    tokenizer.chat_template = CHAT_TEMPLATES[name]


# --- loading -------------------------------------------------------------------------------


def has_no_splits(name: str) -> bool:
    """Sources that are a single dataset, whatever split is asked for: a .json/.jsonl/.parquet
    file or a ``save_to_disk`` folder of one Dataset."""
    return name.endswith((".json", ".jsonl", ".parquet")) or (
        Path(name).is_dir() and not (Path(name) / "dataset_dict.json").exists()
        and (Path(name) / "state.json").exists())


def load_source(name: str, split: str) -> Dataset:
    """One split of one dataset source.

    ``name`` is a .json/.jsonl/.parquet file (the file is the split; ``split`` is ignored), a
    ``save_to_disk`` folder (a DatasetDict, a single Dataset, or one folder per split as
    open-instruct writes them), a local folder in the Hub layout (``data/{split}-*.parquet``),
    or a Hub dataset id.
    """
    path = Path(name)
    try:
        if name.endswith((".json", ".jsonl")):
            return load_dataset("json", data_files=name, split="train")
        if name.endswith(".parquet"):
            return load_dataset("parquet", data_files=name, split="train")
        if path.is_dir():
            if (path / "dataset_dict.json").exists():
                saved = load_from_disk(str(path))
                if split not in saved:
                    raise DataError(f"{name}: no split {split!r} (splits: {', '.join(saved)})")
                return saved[split]
            if (path / "state.json").exists():
                return load_from_disk(str(path))
            if (path / split / "state.json").exists():
                return load_from_disk(str(path / split))
        return load_dataset(name, split=split)
    except (OSError, ValueError, DatasetsError) as exc:
        # datasets raises many types for "not there" / "no such split" / "unreadable";
        # all of them mean the same thing to the user.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load {name}[{split}]: {first_line}") from None


def select_rows(dataset: Dataset, amount: float, where: str) -> Dataset:
    """The first ``amount`` rows: a fraction of the split if amount <= 1, else a row count."""
    n = int(amount * len(dataset)) if amount <= 1 else int(amount)
    if n > len(dataset):
        raise DataError(f"--dataset_mixer: {where} has {len(dataset)} rows, {n} requested")
    if n == 0:
        raise DataError(f"--dataset_mixer: {amount} of {where} ({len(dataset)} rows) selects no rows")
    return dataset.select(range(n))


def _as_messages(value: Any, prompt: Any) -> tuple[list[dict] | None, str]:
    """A chosen/rejected cell -> (message list, "") or (None, why it is invalid)."""
    if value is None:
        return None, "missing"
    if isinstance(value, str):
        if not value.strip():
            return None, "empty"
        if isinstance(prompt, str) and prompt.strip():
            return [{"content": prompt, "role": "user"}, {"content": value, "role": "assistant"}], ""
        if not isinstance(prompt, list):
            return None, "is a plain string but the row has no 'prompt' string or messages"
        value = [{"content": value, "role": "assistant"}]
    if not isinstance(value, list):
        return None, f"expected a list of messages or a string, got {type(value).__name__}"
    if not value:
        return None, "empty"
    if isinstance(prompt, list):  # trl's explicit-prompt format: the prompt is not repeated
        value = prompt + value
    messages = []
    for k, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return None, f"message {k} is not a {{role, content}} mapping of strings"
        messages.append({"content": message["content"], "role": message["role"]})
    if len(messages) < 2:
        return None, f"needs a prompt and a reply, got {len(messages)} message(s)"
    if not messages[-1]["content"].strip():
        return None, "the last message is empty"
    return messages, ""


def _normalize_batch(batch: dict[str, list], has_prompt: bool) -> dict[str, list]:
    out: dict[str, list] = {CHOSEN_KEY: [], REJECTED_KEY: [], _INVALID_KEY: []}
    for i in range(len(batch[CHOSEN_KEY])):
        prompt = batch[PROMPT_KEY][i] if has_prompt else None
        chosen, chosen_error = _as_messages(batch[CHOSEN_KEY][i], prompt)
        rejected, rejected_error = _as_messages(batch[REJECTED_KEY][i], prompt)
        out[CHOSEN_KEY].append(chosen or [])
        out[REJECTED_KEY].append(rejected or [])
        out[_INVALID_KEY].append(
            f"chosen {chosen_error}" if chosen_error else f"rejected {rejected_error}" if rejected_error else ""
        )
    return out


def normalize_preferences(dataset: Dataset, where: str, invalid_rows: str, num_proc: int) -> Dataset:
    """Keep only ``chosen``/``rejected`` as message lists; report and drop (or refuse) bad rows.

    Row indices in reports are positions in the source split. Validation runs inside a
    (cached, parallel) ``map``; the reasons come back as a column so they can be logged here.
    """
    for column in (CHOSEN_KEY, REJECTED_KEY):
        if column not in dataset.column_names:
            raise DataError(f"{where}: missing column {column!r} (columns: {', '.join(dataset.column_names)})")
    normalized = dataset.map(
        _normalize_batch,
        batched=True,
        fn_kwargs={"has_prompt": PROMPT_KEY in dataset.column_names},
        remove_columns=dataset.column_names,
        features=_NORMALIZED_FEATURES,
        num_proc=get_num_proc(len(dataset), num_proc, APPLY_CHAT_TEMPLATE_EXAMPLES_PER_SECOND_PER_CPU),
        desc=f"Validating {where}",
    )
    invalid = [(i, why) for i, why in enumerate(normalized[_INVALID_KEY]) if why]
    if invalid:
        details = "; ".join(f"row {i}: {why}" for i, why in invalid[:_MAX_REPORTED_ROWS])
        if len(invalid) > _MAX_REPORTED_ROWS:
            details += f"; ... and {len(invalid) - _MAX_REPORTED_ROWS} more"
        if len(invalid) == len(normalized):
            raise DataError(f"{where}: no valid rows ({details})")
        if invalid_rows == "error":
            raise DataError(f"{where}: {len(invalid)} invalid row(s): {details} (--invalid_rows drop skips them)")
        logger.warning("%s: dropping %d invalid row(s): %s", where, len(invalid), details)
        bad = {i for i, _ in invalid}
        normalized = normalized.select([i for i in range(len(normalized)) if i not in bad])
    return normalized.remove_columns(_INVALID_KEY)


def _per_source(splits: Sequence[str], count: int) -> list[str]:
    return list(splits) * count if len(splits) == 1 else list(splits)


def load_mixture(
    mixer: dict[str, float],
    splits: Sequence[str],
    *,
    invalid_rows: str = "drop",
    num_proc: int = 1,
    max_rows_per_source: int | None = None,
) -> Dataset:
    """Load, subset, validate and concatenate the datasets of a mixer (open-instruct's
    ``combine_dataset``). One split applies to every dataset; otherwise one split per dataset.
    ``max_rows_per_source`` caps each source early (sanity-check mode)."""
    splits = _per_source(splits, len(mixer))
    if len(splits) != len(mixer):
        raise ValueError(f"{len(splits)} splits for {len(mixer)} datasets")
    parts = []
    for (name, amount), split in zip(mixer.items(), splits):
        where = f"{name}[{split}]"
        dataset = select_rows(load_source(name, split), amount, where)
        if max_rows_per_source is not None:
            dataset = dataset.select(range(min(max_rows_per_source, len(dataset))))
        parts.append(normalize_preferences(dataset, where, invalid_rows, num_proc))
        logger.info("%s: %d rows", where, len(parts[-1]))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


# --- tokenization --------------------------------------------------------------------------


class PreferenceDatasetProcessor:
    """Tokenize and length-filter preference pairs (open-instruct's API).

    ``config`` is a RewardConfig, or anything with ``max_token_length``,
    ``max_prompt_token_length``, ``sanity_check``, ``sanity_check_max_samples`` and
    ``num_proc``. The tokenizer must already carry its chat template (``set_chat_template``).
    """

    def __init__(self, tokenizer, config) -> None:
        self.tokenizer = tokenizer
        self.config = config

    @property
    def num_proc(self) -> int:
        return self.config.num_proc or min(8, os.cpu_count() or 1)

    def sanity_check_(self, dataset: DatasetDict) -> DatasetDict:
        """In sanity-check mode, keep only the first ``sanity_check_max_samples`` rows of each
        split (in place, as open-instruct does; also returned)."""
        if self.config.sanity_check:
            for split, ds in dataset.items():
                dataset[split] = ds.select(range(min(self.config.sanity_check_max_samples, len(ds))))
        return dataset

    def _tokenizer_fingerprint(self) -> str:
        # The tokenizer object does not hash stably across loads, so datasets' automatic
        # fingerprint would miss the cache; hash what determines the tokens instead.
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        return Hasher.hash((
            _TOKENIZE_VERSION,
            backend.to_str() if backend is not None else tok.name_or_path,
            tok.chat_template,
            sorted(tok.special_tokens_map.items()),
        ))

    def tokenize(self, dataset: T) -> T:
        """Add ``input_ids_prompt`` (``chosen[:-1]`` + generation prompt), ``input_ids_chosen``
        and ``input_ids_rejected``. Cached: re-running on the same data and tokenizer reuses
        the result on disk."""
        tokenizer = self.tokenizer
        tokenizer_fingerprint = self._tokenizer_fingerprint()

        def tokenize_batch(batch: dict[str, list]) -> dict[str, list]:
            prompts = [messages[:-1] for messages in batch[CHOSEN_KEY]]
            return {
                INPUT_IDS_PROMPT_KEY: tokenizer.apply_chat_template(
                    prompts, add_generation_prompt=True, return_dict=False),
                INPUT_IDS_CHOSEN_KEY: tokenizer.apply_chat_template(batch[CHOSEN_KEY], return_dict=False),
                INPUT_IDS_REJECTED_KEY: tokenizer.apply_chat_template(batch[REJECTED_KEY], return_dict=False),
            }

        def tokenize_split(ds: Dataset, split: str) -> Dataset:
            return ds.map(
                tokenize_batch,
                batched=True,
                num_proc=get_num_proc(len(ds), self.num_proc, APPLY_CHAT_TEMPLATE_EXAMPLES_PER_SECOND_PER_CPU),
                new_fingerprint=Hasher.hash((ds._fingerprint, tokenizer_fingerprint)),
                desc=f"Tokenizing {split}",
            )

        return _each_split(dataset, tokenize_split)

    def filter(self, dataset: T) -> T:
        """Drop pairs whose prompt exceeds ``max_prompt_token_length`` or whose chosen or
        rejected sequence exceeds ``max_token_length`` (None: no limit)."""
        max_prompt = self.config.max_prompt_token_length
        max_length = self.config.max_token_length

        def keep(prompts: list, chosen: list, rejected: list) -> list[bool]:
            return [
                (max_prompt is None or len(p) <= max_prompt)
                and (max_length is None or (len(c) <= max_length and len(r) <= max_length))
                for p, c, r in zip(prompts, chosen, rejected)
            ]

        def filter_split(ds: Dataset, split: str) -> Dataset:
            if max_prompt is None and max_length is None:
                return ds
            kept = ds.filter(
                keep,
                batched=True,
                input_columns=[INPUT_IDS_PROMPT_KEY, INPUT_IDS_CHOSEN_KEY, INPUT_IDS_REJECTED_KEY],
                num_proc=get_num_proc(len(ds), self.num_proc, FILTER_EXAMPLES_PER_SECOND_PER_CPU),
                desc=f"Filtering {split}",
            )
            logger.info("%s: %d of %d pairs within the token limits", split, len(kept), len(ds))
            return kept

        return _each_split(dataset, filter_split)

    def get_token_length_visualization(self, dataset: Dataset | DatasetDict, save_path: str = "tmp.png",
                                       bins: int = 30) -> str:
        """Histograms of chosen/rejected/prompt token lengths, one row per split, as a PNG."""
        from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

        splits = dataset if isinstance(dataset, DatasetDict) else {"dataset": dataset}
        fig = Figure(figsize=(5 * len(TOKEN_LENGTH_FEATURES), 3.5 * len(splits)), layout="tight")
        axes = fig.subplots(len(splits), len(TOKEN_LENGTH_FEATURES), squeeze=False)
        for row, (split, ds) in enumerate(splits.items()):
            for col, feature in enumerate(TOKEN_LENGTH_FEATURES):
                lengths = [len(ids) for ids in ds[feature]]
                ax = axes[row][col]
                ax.hist(lengths, bins=bins)
                ax.set_title(f"{split}: {feature} length")
                ax.set_xlabel("tokens")
                ax.set_ylabel("pairs")
        fig.savefig(save_path)
        return save_path


_TOKEN_BACKGROUNDS = ("41", "42", "44", "43", "45")  # ANSI red, green, blue, yellow, magenta


def visualize_token(tokens: Sequence[int], tokenizer) -> None:
    """Print each token on its own background colour, to see how a text was tokenized."""
    print("".join(
        f"\x1b[{_TOKEN_BACKGROUNDS[i % len(_TOKEN_BACKGROUNDS)]}m{tokenizer.decode(token)}\x1b[0m"
        for i, token in enumerate(tokens)
    ))


# --- everything together ---------------------------------------------------------------------


def eval_mixer(cfg) -> dict[str, float]:
    """``--dataset_eval_mixer``, or by default every training dataset read whole at its
    ``--dataset_eval_splits`` split (the training mixer's fractions and row counts are for its
    training splits). A default that would be training rows is a DataError: a source without
    splits, or an eval split equal to the training split."""
    if cfg.dataset_eval_mixer:
        return cfg.dataset_eval_mixer
    names = list(cfg.dataset_mixer)
    pairs = zip(names, _per_source(cfg.dataset_train_splits, len(names)),
                _per_source(cfg.dataset_eval_splits, len(names)))
    for name, train_split, eval_split in pairs:
        if has_no_splits(name):
            raise DataError(f"--dataset_eval_mixer is needed: {name} has no splits, so the default eval set "
                            "(the training datasets at --dataset_eval_splits) would be the training rows")
        if eval_split == train_split:
            raise DataError(f"--dataset_eval_splits: {name} would be evaluated on its training split "
                            f"{train_split!r}; name another split or give --dataset_eval_mixer")
    return dict.fromkeys(names, 1.0)


def build_datasets(cfg, tokenizer) -> tuple[Dataset, Dataset | None]:
    """RewardConfig -> (train, eval) tokenized, filtered datasets; eval is None with
    ``num_evals 0`` (nothing is loaded that would not be used).

    Sets the tokenizer's chat template from ``cfg.chat_template``. The eval datasets are
    :func:`eval_mixer`'s. Columns: ``chosen``, ``rejected`` (messages) and the three
    ``input_ids_*`` lists.
    """
    set_chat_template(tokenizer, cfg.chat_template)
    processor = PreferenceDatasetProcessor(tokenizer, cfg)
    options = {
        "invalid_rows": cfg.invalid_rows,
        "num_proc": processor.num_proc,
        "max_rows_per_source": cfg.sanity_check_max_samples if cfg.sanity_check else None,
    }
    dataset = DatasetDict({"train": load_mixture(cfg.dataset_mixer, cfg.dataset_train_splits, **options)})
    if cfg.num_evals > 0:
        dataset["eval"] = load_mixture(eval_mixer(cfg), cfg.dataset_eval_splits, **options)
    processor.sanity_check_(dataset)
    tokenized = processor.tokenize(dataset)
    filtered = processor.filter(tokenized)
    for split, ds in filtered.items():
        if len(ds) == 0:
            full = tokenized[split]
            pairs = zip(full[INPUT_IDS_CHOSEN_KEY], full[INPUT_IDS_REJECTED_KEY])
            shortest_pair = min(max(len(c), len(r)) for c, r in pairs)
            shortest_prompt = min(len(p) for p in full[INPUT_IDS_PROMPT_KEY])
            raise DataError(
                f"the {split} dataset is empty after filtering with --max_token_length "
                f"{cfg.max_token_length} and --max_prompt_token_length {cfg.max_prompt_token_length} "
                f"(shortest pair: {shortest_pair} tokens, shortest prompt: {shortest_prompt} tokens)"
            )
    return filtered["train"], filtered.get("eval")
