"""Preference data: loading and mixing datasets, validating rows, tokenizing, filtering.

Follows open-instruct's ``dataset_processor.py`` (``CHAT_TEMPLATES``,
``PreferenceDatasetProcessor``, ``visualize_token``) and its dataset-mixer semantics, with
these differences:

* ``filter`` checks ``max_prompt_token_length`` AND ``max_token_length`` on both chosen and
  rejected (open-instruct's nested conditional skipped the length check whenever a prompt
  limit was set, and the rejected check whenever ``max_token_length`` was set);
* rows whose ``chosen``/``rejected`` is missing, empty or ill-typed are reported by index and
  dropped (or rejected with ``--invalid_rows error``) instead of crashing tokenization;
* plain-string ``chosen``/``rejected`` with a ``prompt`` column, trl's explicit-prompt format
  (``prompt`` as a message list), raw Anthropic/hh-rlhf strings (parsed into messages, also when
  the turns are in ``prompt`` and the replies alone in ``chosen``/``rejected``, as in
  Dahoas/rm-static) and trl's plain-text format (raw text, EOS appended, no chat template) are
  accepted besides trl-style message lists; the format is detected per row and reported per dataset, and a row whose
  ``chosen`` and ``rejected`` differ in format is invalid;
* an optional numeric ``margin`` column (trl's) is kept for the loss;
* a mixer value of ``1`` means the whole split (see ``cli._to_mixer``);
* without ``--dataset_eval_mixer`` the eval set is each training dataset's whole
  ``--dataset_eval_splits`` split, and never its training rows (see ``eval_mixer``).

Subsets are the first rows of each split, as in open-instruct (no shuffling here: the training
loop shuffles with ``--seed``).
"""

from __future__ import annotations

import logging
import math
import os
import re
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
from rmjob_trainer.preflight import check_default_eval_set

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
MARGIN_KEY = "margin"
# A plain-text pair (no chat template) keeps its strings here; its message lists stay empty.
CHOSEN_TEXT_KEY = "chosen_text"
REJECTED_TEXT_KEY = "rejected_text"
INPUT_IDS_CHOSEN_KEY = "input_ids_chosen"
INPUT_IDS_REJECTED_KEY = "input_ids_rejected"
INPUT_IDS_PROMPT_KEY = "input_ids_prompt"
TOKEN_LENGTH_FEATURES = (INPUT_IDS_CHOSEN_KEY, INPUT_IDS_REJECTED_KEY, INPUT_IDS_PROMPT_KEY)

# open-instruct's throughput estimates, used to avoid spawning workers for small datasets.
APPLY_CHAT_TEMPLATE_EXAMPLES_PER_SECOND_PER_CPU = 400
FILTER_EXAMPLES_PER_SECOND_PER_CPU = 1130

MESSAGES = List({"content": Value("string"), "role": Value("string")})
_INVALID_KEY = "__invalid__"
_FORMAT_KEY = "__format__"
_NORMALIZED_FEATURES = Features({
    CHOSEN_KEY: MESSAGES, REJECTED_KEY: MESSAGES, CHOSEN_TEXT_KEY: Value("string"),
    REJECTED_TEXT_KEY: Value("string"), MARGIN_KEY: Value("float64"), _INVALID_KEY: Value("string"),
    _FORMAT_KEY: Value("string"),
})
_MAX_REPORTED_ROWS = 20
# Bump when the tokenization below changes, so cached results from older code are not reused.
_TOKENIZE_VERSION = "2"

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


# Row formats, as reported on the console.
CONVERSATIONAL = "conversational (chosen/rejected message lists)"
EXPLICIT_PROMPT = "conversational with explicit prompt (prompt message list)"
PROMPT_COMPLETION = "prompt string + chosen/rejected strings"
HH_RLHF = "hh-rlhf (raw '\\n\\nHuman: ... \\n\\nAssistant: ...' strings)"
HH_RLHF_PROMPT = "hh-rlhf prompt ('\\n\\nHuman: ... \\n\\nAssistant:' string) + chosen/rejected completion strings"
PLAIN_TEXT = "plain text (implicit prompt, no chat template)"

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_messages(value: str) -> tuple[list[dict] | None, str]:
    """Anthropic/hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages."""
    parts = _HH_TURN.split("\n\n" + value.lstrip())
    if parts[0].strip():
        return None, "has text before its first 'Human:' turn"
    messages = [{"content": content.strip(), "role": _HH_ROLES[speaker]}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] != "assistant":
        return None, "is an hh-rlhf conversation that does not end with an 'Assistant:' turn"
    if not messages[-1]["content"]:
        return None, "the last message is empty"
    return messages, ""


def _has_hh_turns(text: str) -> bool:
    return bool(re.match(r"\s*Human:", text) and _HH_TURN.search("\n\n" + text.lstrip()))


def _cell_format(value: Any, prompt: Any) -> str | None:
    """The format a chosen/rejected cell is written in (None: not a string or a list)."""
    if isinstance(prompt, list) and isinstance(value, (str, list)):
        return EXPLICIT_PROMPT
    if isinstance(value, list):
        return CONVERSATIONAL
    if not isinstance(value, str):
        return None
    if isinstance(prompt, str) and prompt.strip():
        return HH_RLHF_PROMPT if _has_hh_turns(prompt) else PROMPT_COMPLETION
    return HH_RLHF if _has_hh_turns(value) else PLAIN_TEXT


def _as_messages(value: Any, prompt: Any, form: str | None) -> tuple[list[dict] | None, str]:
    """A chosen/rejected cell in a conversational format -> (message list, "") or (None, why
    it is invalid)."""
    if value is None:
        return None, "missing"
    if isinstance(value, str):
        if not value.strip():
            return None, "empty"
        if form == HH_RLHF:
            return _hh_messages(value)
        if form == HH_RLHF_PROMPT:  # the prompt ends with "\n\nAssistant:", the reply completes it
            return _hh_messages(prompt + value)
        if form == PROMPT_COMPLETION:
            return [{"content": prompt, "role": "user"}, {"content": value, "role": "assistant"}], ""
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


def _margin_error(margin: Any) -> str:
    if margin is None:
        return "margin missing"
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return f"margin {margin!r} is not a finite number"
    return ""


def _normalize_row(chosen: Any, rejected: Any, prompt: Any) -> dict:
    row = {CHOSEN_KEY: [], REJECTED_KEY: [], CHOSEN_TEXT_KEY: "", REJECTED_TEXT_KEY: "", _INVALID_KEY: "",
           _FORMAT_KEY: ""}
    chosen_format, rejected_format = _cell_format(chosen, prompt), _cell_format(rejected, prompt)
    if chosen_format and rejected_format and chosen_format != rejected_format:
        row[_INVALID_KEY] = f"mixes formats: chosen is {chosen_format}, rejected is {rejected_format}"
        return row
    row[_FORMAT_KEY] = chosen_format or rejected_format or ""
    if row[_FORMAT_KEY] == PLAIN_TEXT:
        for key, text_key, value in ((CHOSEN_KEY, CHOSEN_TEXT_KEY, chosen), (REJECTED_KEY, REJECTED_TEXT_KEY, rejected)):
            if not isinstance(value, str) or not value.strip():
                why = "missing" if value is None else "empty" if isinstance(value, str) else (
                    f"expected a string like its pair, got {type(value).__name__}")
                row[_INVALID_KEY] = f"{key} {why}"
                return row
            row[text_key] = value
        return row
    for key, value in ((CHOSEN_KEY, chosen), (REJECTED_KEY, rejected)):
        row[key], error = _as_messages(value, prompt, row[_FORMAT_KEY])
        if error:
            row[_INVALID_KEY] = f"{key} {error}"
            return row
    return row


def _normalize_batch(batch: dict[str, list], has_prompt: bool, has_margin: bool) -> dict[str, list]:
    out: dict[str, list] = {key: [] for key in _NORMALIZED_FEATURES}
    for i in range(len(batch[CHOSEN_KEY])):
        prompt = batch[PROMPT_KEY][i] if has_prompt else None
        row = _normalize_row(batch[CHOSEN_KEY][i], batch[REJECTED_KEY][i], prompt)
        margin = batch[MARGIN_KEY][i] if has_margin else 0.0
        if not row[_INVALID_KEY]:
            row[_INVALID_KEY] = _margin_error(margin)
        row[MARGIN_KEY] = float(margin) if not row[_INVALID_KEY] else 0.0
        for key, value in row.items():
            out[key].append(value)
    return out


def _report_formats(formats: list[str], where: str) -> None:
    """``formats``: each row's format, "" for an invalid row."""
    first_row: dict[str, int] = {}
    for i, form in enumerate(formats):
        if form:
            first_row.setdefault(form, i)
    counts = {form: formats.count(form) for form in first_row}
    if len(counts) == 1:
        # print, not logger.info: the CLI configures no logging, and the format chosen for a
        # dataset is what a user checks first when a run trains on the wrong text.
        print(f"{where}: format {next(iter(counts))}")
        return
    logger.warning("%s: rows in %d formats: %s", where, len(counts), "; ".join(
        f"{form}: {count} row(s), first row {first_row[form]}" for form, count in counts.items()))


def normalize_preferences(dataset: Dataset, where: str, invalid_rows: str, num_proc: int) -> Dataset:
    """Keep only ``chosen``/``rejected`` as message lists (``chosen_text``/``rejected_text``
    besides them when the dataset has plain-text rows, ``margin`` when it has that column);
    report the formats found; report and drop (or refuse) bad rows.

    Row indices in reports are positions in the source split. Validation runs inside a
    (cached, parallel) ``map``; the reasons come back as a column so they can be logged here.
    """
    for column in (CHOSEN_KEY, REJECTED_KEY):
        if column not in dataset.column_names:
            raise DataError(f"{where}: missing column {column!r} (columns: {', '.join(dataset.column_names)})")
    has_margin = MARGIN_KEY in dataset.column_names
    normalized = dataset.map(
        _normalize_batch,
        batched=True,
        fn_kwargs={"has_prompt": PROMPT_KEY in dataset.column_names, "has_margin": has_margin},
        remove_columns=dataset.column_names,
        features=_NORMALIZED_FEATURES,
        num_proc=get_num_proc(len(dataset), num_proc, APPLY_CHAT_TEMPLATE_EXAMPLES_PER_SECOND_PER_CPU),
        desc=f"Validating {where}",
    )
    invalid = [(i, why) for i, why in enumerate(normalized[_INVALID_KEY]) if why]
    formats = [form if not why else "" for form, why in zip(normalized[_FORMAT_KEY], normalized[_INVALID_KEY])]
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
    _report_formats(formats, where)
    unused = [_INVALID_KEY, _FORMAT_KEY]
    if PLAIN_TEXT not in formats:
        unused += [CHOSEN_TEXT_KEY, REJECTED_TEXT_KEY]
    if not has_margin:
        unused.append(MARGIN_KEY)
    return normalized.remove_columns(unused)


def _concatenate(parts: list[Dataset]) -> Dataset:
    """Concatenate sources whose optional columns differ: plain-text columns default to "",
    margins to 0."""
    columns = {column for part in parts for column in part.column_names}
    defaults = {CHOSEN_TEXT_KEY: "", REJECTED_TEXT_KEY: "", MARGIN_KEY: 0.0}
    aligned = []
    for part in parts:
        for column in columns - set(part.column_names):
            part = part.add_column(column, [defaults[column]] * len(part),
                                   feature=_NORMALIZED_FEATURES[column])
        aligned.append(part.select_columns(sorted(columns)))
    return concatenate_datasets(aligned)


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
    return parts[0] if len(parts) == 1 else _concatenate(parts)


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

        def tokenize_messages(batch: dict[str, list]) -> dict[str, list]:
            prompts = [messages[:-1] for messages in batch[CHOSEN_KEY]]
            return {
                INPUT_IDS_PROMPT_KEY: tokenizer.apply_chat_template(
                    prompts, add_generation_prompt=True, return_dict=False),
                INPUT_IDS_CHOSEN_KEY: tokenizer.apply_chat_template(batch[CHOSEN_KEY], return_dict=False),
                INPUT_IDS_REJECTED_KEY: tokenizer.apply_chat_template(batch[REJECTED_KEY], return_dict=False),
            }

        def tokenize_texts(chosen: list[str], rejected: list[str]) -> dict[str, list]:
            """As trl tokenizes its plain-text format: the raw text, EOS appended (the reward is
            read there), and the implicit prompt is what chosen and rejected share."""
            eos = tokenizer.eos_token or ""

            def ids(texts: list[str], end: str) -> list[list[int]]:
                return tokenizer([t if t.endswith(end) else t + end for t in texts])["input_ids"]

            prompts = [os.path.commonprefix([c, r]) for c, r in zip(chosen, rejected)]
            return {INPUT_IDS_PROMPT_KEY: ids(prompts, ""), INPUT_IDS_CHOSEN_KEY: ids(chosen, eos),
                    INPUT_IDS_REJECTED_KEY: ids(rejected, eos)}

        def tokenize_batch(batch: dict[str, list]) -> dict[str, list]:
            if CHOSEN_TEXT_KEY not in batch:
                return tokenize_messages(batch)
            text_rows = [i for i, text in enumerate(batch[CHOSEN_TEXT_KEY]) if text]
            message_rows = [i for i, text in enumerate(batch[CHOSEN_TEXT_KEY]) if not text]
            out: dict[str, list] = {key: [None] * len(batch[CHOSEN_KEY]) for key in TOKEN_LENGTH_FEATURES}
            parts = [(text_rows, lambda rows: tokenize_texts([batch[CHOSEN_TEXT_KEY][i] for i in rows],
                                                             [batch[REJECTED_TEXT_KEY][i] for i in rows])),
                     (message_rows, lambda rows: tokenize_messages({key: [batch[key][i] for i in rows]
                                                                    for key in (CHOSEN_KEY, REJECTED_KEY)}))]
            for rows, tokenize_rows in parts:
                if rows:
                    for key, values in tokenize_rows(rows).items():
                        for i, value in zip(rows, values):
                            out[key][i] = value
            return out

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
    training splits). A default that would be training rows is a DataError
    (:func:`rmjob_trainer.preflight.check_default_eval_set`, also a first-run check)."""
    if cfg.dataset_eval_mixer:
        return cfg.dataset_eval_mixer
    check_default_eval_set(cfg)
    return dict.fromkeys(cfg.dataset_mixer, 1.0)


def build_datasets(cfg, tokenizer) -> tuple[Dataset, Dataset | None]:
    """RewardConfig -> (train, eval) tokenized, filtered datasets; eval is None with
    ``num_evals 0`` (nothing is loaded that would not be used).

    Sets the tokenizer's chat template from ``cfg.chat_template``. The eval datasets are
    :func:`eval_mixer`'s. Columns: ``chosen``, ``rejected`` (messages), the three
    ``input_ids_*`` lists, ``chosen_text``/``rejected_text`` when a source is plain text and
    ``margin`` when a source has margins.
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
