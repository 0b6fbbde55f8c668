"""Data pipeline: sources, mixer, row validation, chat templates, tokenization, filtering,
the bundled dataset and the tiny model builder."""

import json
import logging
import os
import re
from dataclasses import replace

import pytest
from datasets import Dataset, DatasetDict, load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmjob_trainer import ConfigError, DataError
from rmjob_trainer.config import RewardConfig
from rmjob_trainer.data import (
    CHAT_TEMPLATES,
    INPUT_IDS_CHOSEN_KEY,
    INPUT_IDS_PROMPT_KEY,
    INPUT_IDS_REJECTED_KEY,
    PreferenceDatasetProcessor,
    build_datasets,
    eval_mixer,
    load_mixture,
    load_source,
    set_chat_template,
    visualize_token,
)
from rmjob_trainer.tiny import build_tiny_model

CHAT = [
    {"content": "This is really an amazing thing.", "role": "user"},
    {"content": "I am glad you said that.", "role": "assistant"},
]


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    user = {"content": prompt, "role": "user"}
    return {"chosen": [user, {"content": chosen, "role": "assistant"}],
            "rejected": [user, {"content": rejected, "role": "assistant"}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def config(mixer, **overrides) -> RewardConfig:
    return RewardConfig(model_name_or_path="unused", dataset_mixer=mixer, num_proc=1, **overrides)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def bundled_train(bundled_dataset_dir):
    return load_dataset(str(bundled_dataset_dir), split="train")


# --- chat templates ----------------------------------------------------------------------------


def test_seed_chat_templates_verbatim_and_rendered(tokenizer):
    """The strings and outputs printed in open-instruct's reward-modeling docs."""
    assert CHAT_TEMPLATES["simple_concat_with_space"] == (
        "{% for message in messages %}{{' ' if not loop.first else ''}}{{message['content']}}{% endfor %}{{eos_token}}"
    )
    assert CHAT_TEMPLATES["simple_chat"] == (
        "{% for message in messages %}{{'\n\n' if not loop.first else ''}}"
        "{{message['role']|capitalize + ': ' +message['content']}}{% endfor %}{{eos_token}}"
    )
    set_chat_template(tokenizer, "simple_concat_with_space")
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "This is really an amazing thing. I am glad you said that.<|endoftext|>"
    )
    set_chat_template(tokenizer, "simple_chat")
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "User: This is really an amazing thing.\n\nAssistant: I am glad you said that.<|endoftext|>"
    )


def test_tulu_and_zephyr_generation_prompts(tokenizer):
    set_chat_template(tokenizer, "tulu")
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "<|user|>\nThis is really an amazing thing.\n<|assistant|>\nI am glad you said that.<|endoftext|>"
    )
    assert tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nThis is really an amazing thing.\n<|assistant|>\n"
    )
    set_chat_template(tokenizer, "zephyr")
    assert tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nThis is really an amazing thing.<|endoftext|><|assistant|>"
    )


def test_tokenizer_template_keeps_its_own_or_fails(tokenizer):
    with pytest.raises(ConfigError, match="^--chat_template: 'tokenizer' asks for"):
        set_chat_template(tokenizer, "tokenizer")
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    set_chat_template(tokenizer, "tokenizer")
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "[This is really an amazing thing.][I am glad you said that.]"
    )


# --- sources and the mixer ----------------------------------------------------------------------


def test_every_source_kind_loads_the_same_rows(tmp_path, bundled_dataset_dir, bundled_train):
    subset = bundled_train.select(range(40))
    rows = subset.to_list()
    subset.to_parquet(str(tmp_path / "rows.parquet"))
    DatasetDict(train=subset, test=subset.select(range(5))).save_to_disk(str(tmp_path / "saved_dict"))
    subset.save_to_disk(str(tmp_path / "saved_one"))
    subset.save_to_disk(str(tmp_path / "per_split" / "train"))  # open-instruct's load_from_disk(ds/split)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    sources = [
        write_jsonl(tmp_path / "rows.jsonl", rows),
        str(tmp_path / "rows.json"),
        str(tmp_path / "rows.parquet"),
        str(tmp_path / "saved_dict"),
        str(tmp_path / "saved_one"),
        str(tmp_path / "per_split"),
    ]
    for source in sources:
        assert load_source(source, "train").to_list() == rows, source
    assert len(load_source(str(bundled_dataset_dir), "test")) == 300  # Hub layout
    assert len(load_source(str(tmp_path / "saved_dict"), "test")) == 5


@pytest.mark.parametrize("source, split, fragment", [
    ("missing.jsonl", "train", "cannot load missing.jsonl[train]"),
    ("{bundled}", "validation", "cannot load {bundled}[validation]"),
    ("no-such-org/no-such-dataset", "train", "cannot load no-such-org/no-such-dataset[train]"),
])
def test_unloadable_sources(bundled_dataset_dir, monkeypatch, tmp_path, source, split, fragment):
    monkeypatch.chdir(tmp_path)
    source, fragment = (s.replace("{bundled}", str(bundled_dataset_dir)) for s in (source, fragment))
    with pytest.raises(DataError) as info:
        load_source(source, split)
    assert str(info.value).startswith(fragment) and "\n" not in str(info.value)


def test_mixer_fractions_counts_and_several_datasets(tmp_path, bundled_dataset_dir, bundled_train):
    bundled = str(bundled_dataset_dir)
    quarter = load_mixture({bundled: 0.25}, ["train"])
    assert len(quarter) == 500
    assert quarter["chosen"] == bundled_train.select(range(500))["chosen"]  # the first rows
    assert len(load_mixture({bundled: 300}, ["train"])) == 300
    assert len(load_mixture({bundled: 1}, ["train"])) == 2000  # 1 means all, not one row

    extra = write_jsonl(tmp_path / "extra.jsonl", [pair(f"p{i}", "good", "bad") for i in range(10)])
    mixed = load_mixture({bundled: 0.1, extra: 4}, ["test", "train"])
    assert len(mixed) == 30 + 4
    assert mixed[30]["chosen"][0]["content"] == "p0"

    with pytest.raises(DataError, match=r"has 10 rows, 11 requested"):
        load_mixture({extra: 11}, ["train"])
    with pytest.raises(DataError, match=r"selects no rows"):
        load_mixture({extra: 0.01}, ["train"])


def test_missing_columns_name_column_and_dataset(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"chosen": [], "answer": "x"}])
    with pytest.raises(DataError, match=r"qa.jsonl\[train\]: missing column 'rejected' \(columns: chosen, answer\)"):
        load_mixture({path: 1.0}, ["train"])


INVALID_ROWS = [
    pair("ok 0", "good", "bad"),
    {"chosen": None, "rejected": pair("p", "a", "b")["rejected"]},
    {"chosen": pair("p", "a", "b")["chosen"], "rejected": []},
    pair("ok 3", "good", "bad"),
    {"chosen": [{"role": "user", "content": "only a prompt"}], "rejected": pair("p", "a", "b")["rejected"]},
    {"chosen": pair("p", "a", "b")["chosen"], "rejected": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
    pair("ok 6", "good", "   "),
]


def test_invalid_rows_are_reported_by_index_and_dropped(tmp_path, caplog):
    path = write_jsonl(tmp_path / "dirty.jsonl", INVALID_ROWS)
    with caplog.at_level(logging.WARNING, logger="rmjob_trainer.data"):
        dataset = load_mixture({path: 1.0}, ["train"])
    assert [row["chosen"][0]["content"] for row in dataset] == ["ok 0", "ok 3"]
    (record,) = [r for r in caplog.records if "invalid" in r.getMessage()]
    message = record.getMessage()
    assert "dirty.jsonl[train]: dropping 5 invalid row(s)" in message
    for expected in ("row 1: chosen missing", "row 2: rejected empty",
                     "row 4: chosen needs a prompt and a reply",
                     "row 5: rejected message 0 is not a {role, content} mapping",
                     "row 6: rejected the last message is empty"):
        assert expected in message


def test_invalid_rows_error_policy(tmp_path):
    path = write_jsonl(tmp_path / "dirty.jsonl", INVALID_ROWS)
    with pytest.raises(DataError, match=r"^.*dirty.jsonl\[train\]: 5 invalid row\(s\): row 1: chosen missing"):
        load_mixture({path: 1.0}, ["train"], invalid_rows="error")


def test_all_rows_invalid_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "strings.jsonl", [{"chosen": "a", "rejected": " "}])
    with pytest.raises(DataError, match=r"no valid rows \(row 0: rejected empty\)"):
        load_mixture({path: 1.0}, ["train"])


def test_plain_strings_with_prompt_and_explicit_prompt_messages(tmp_path):
    user = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "hi", "chosen": "hello!", "rejected": "go away", "score": 3},
    ])
    explicit = write_jsonl(tmp_path / "explicit.jsonl", [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "hello!"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
    ])
    expected = {"chosen": user + [{"role": "assistant", "content": "hello!"}],
                "rejected": user + [{"role": "assistant", "content": "go away"}]}
    for source in (path, explicit):
        (row,) = load_mixture({source: 1.0}, ["train"]).to_list()
        assert row == {"chosen": [{"content": m["content"], "role": m["role"]} for m in expected["chosen"]],
                       "rejected": [{"content": m["content"], "role": m["role"]} for m in expected["rejected"]]}


# --- tokenization and filtering -------------------------------------------------------------------


def test_tokenize_follows_open_instruct(tokenizer, bundled_train):
    set_chat_template(tokenizer, "simple_chat")
    processor = PreferenceDatasetProcessor(tokenizer, config({"x": 1.0}))
    dataset = processor.tokenize(bundled_train.select(range(8)))
    row = dataset[3]
    assert row[INPUT_IDS_PROMPT_KEY] == tokenizer.apply_chat_template(
        row["chosen"][:-1], add_generation_prompt=True, return_dict=False)
    assert row[INPUT_IDS_CHOSEN_KEY] == tokenizer.apply_chat_template(row["chosen"], return_dict=False)
    assert row[INPUT_IDS_REJECTED_KEY] == tokenizer.apply_chat_template(row["rejected"], return_dict=False)
    assert tokenizer.decode(row[INPUT_IDS_CHOSEN_KEY]).startswith("User: ")
    assert row[INPUT_IDS_CHOSEN_KEY][-1] == tokenizer.eos_token_id


def test_tokenization_is_cached_across_tokenizer_loads(tiny_model_dir, tmp_path, bundled_train):
    source = str(tmp_path / "rows.parquet")
    bundled_train.select(range(64)).to_parquet(source)

    def tokenize_once(template="simple_chat"):
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # a fresh object each time
        set_chat_template(tok, template)
        dataset = load_mixture({source: 1.0}, ["train"])
        return PreferenceDatasetProcessor(tok, config({source: 1.0})).tokenize(dataset)

    first = tokenize_once()
    (cache_file,) = [f["filename"] for f in first.cache_files]  # the tokenized arrow file
    mtime = os.stat(cache_file).st_mtime_ns
    second = tokenize_once()
    assert second._fingerprint == first._fingerprint
    assert cache_file in {f["filename"] for f in second.cache_files}
    assert os.stat(cache_file).st_mtime_ns == mtime  # read back, not recomputed
    assert tokenize_once("simple_concat_with_space")._fingerprint != first._fingerprint


def lengths_dataset(rows):
    """Pre-tokenized rows of (prompt, chosen, rejected) lengths."""
    return Dataset.from_dict({
        INPUT_IDS_PROMPT_KEY: [[1] * p for p, _, _ in rows],
        INPUT_IDS_CHOSEN_KEY: [[1] * c for _, c, _ in rows],
        INPUT_IDS_REJECTED_KEY: [[1] * r for _, _, r in rows],
    })


def test_filter_checks_prompt_chosen_and_rejected(tokenizer):
    """open-instruct's filter skipped the chosen/rejected checks when a prompt limit was set
    (rows 1, 2 survived) and the rejected check when max_token_length was set (row 2)."""
    dataset = lengths_dataset([(3, 8, 8), (3, 20, 8), (3, 8, 20), (12, 8, 8), (10, 10, 10)])
    processor = PreferenceDatasetProcessor(tokenizer, config({"x": 1}, max_prompt_token_length=10, max_token_length=10))
    kept = processor.filter(dataset)
    assert [len(ids) for ids in kept[INPUT_IDS_CHOSEN_KEY]] == [8, 10]
    only_length = PreferenceDatasetProcessor(tokenizer, config({"x": 1}, max_token_length=10)).filter(dataset)
    assert len(only_length) == 3  # rows 0, 3, 4: the rejected side counts too
    assert len(PreferenceDatasetProcessor(tokenizer, config({"x": 1})).filter(dataset)) == 5


def test_sanity_check_keeps_max_samples_per_split(tokenizer, bundled_train):
    processor = PreferenceDatasetProcessor(tokenizer, config({"x": 1}, sanity_check=True, sanity_check_max_samples=7))
    dataset = DatasetDict(train=bundled_train, eval=bundled_train.select(range(3)))
    processor.sanity_check_(dataset)
    assert (len(dataset["train"]), len(dataset["eval"])) == (7, 3)


def test_build_datasets_seed_level0_locally(tiny_model_dir, bundled_dataset_dir):
    """Level 0's flags (sanity check, simple_concat_with_space, the mixer given twice), on local data."""
    from rmjob_trainer.cli import parse_args

    mixer = json.dumps({str(bundled_dataset_dir): 1.0})
    cfg = parse_args([
        "--dataset_mixer", mixer, "--dataset_train_splits", "train", "--dataset_mixer", mixer,
        "--dataset_eval_splits", "test", "--model_name_or_path", str(tiny_model_dir),
        "--chat_template", "simple_concat_with_space", "--max_token_length", "1024",
        "--max_prompt_token_length", "1024", "--sanity_check",
    ])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, evaluation = build_datasets(cfg, tokenizer)
    assert (len(train), len(evaluation)) == (100, 100)
    assert tokenizer.chat_template == CHAT_TEMPLATES["simple_concat_with_space"]
    assert set(train.column_names) >= {INPUT_IDS_PROMPT_KEY, INPUT_IDS_CHOSEN_KEY, INPUT_IDS_REJECTED_KEY}
    assert train[0]["chosen"] != evaluation[0]["chosen"]  # train and test splits, not the same rows


def test_build_datasets_in_parallel_and_empty_after_filter(tiny_model_dir, bundled_dataset_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = replace(config({str(bundled_dataset_dir): 1.0}), num_proc=2, max_token_length=256)
    train, evaluation = build_datasets(cfg, tokenizer)  # 2000 rows: two tokenizer workers
    assert (len(train), len(evaluation)) == (2000, 300)
    with pytest.raises(DataError, match=r"^the train dataset is empty after filtering with --max_token_length 4 "
                                        r"and --max_prompt_token_length None \(shortest pair: \d+ tokens"):
        build_datasets(replace(cfg, max_token_length=4), tokenizer)


def test_token_length_plot_and_visualize_token(tokenizer, bundled_train, tmp_path, capsys):
    set_chat_template(tokenizer, "simple_chat")
    processor = PreferenceDatasetProcessor(tokenizer, config({"x": 1}))
    splits = DatasetDict(train=bundled_train.select(range(50)), eval=bundled_train.select(range(9)))
    dataset = processor.tokenize(splits)
    png = tmp_path / "lengths.png"
    processor.get_token_length_visualization(dataset, save_path=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ids = dataset["train"][0][INPUT_IDS_CHOSEN_KEY]
    visualize_token(ids, tokenizer)
    out = capsys.readouterr().out
    assert out.count("\x1b[0m") == len(ids) and "\x1b[41m" in out and "\x1b[42m" in out
    plain = out.replace("\x1b[0m", "")
    for code in ("41", "42", "44", "43", "45"):
        plain = plain.replace(f"\x1b[{code}m", "")
    assert plain.rstrip("\n") == tokenizer.decode(ids)


# --- bundled data and the tiny model --------------------------------------------------------------


def test_bundled_dataset_shape(bundled_dataset_dir):
    data = load_dataset(str(bundled_dataset_dir))
    assert {split: len(ds) for split, ds in data.items()} == {"train": 2000, "test": 300}
    row = data["train"][0]
    assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["user", "assistant"]
    assert row["chosen"][0] == row["rejected"][0] and row["chosen"][1] != row["rejected"][1]
    chosen_longer = sum(len(r["chosen"][1]["content"]) > len(r["rejected"][1]["content"]) for r in data["train"])
    assert 0.35 < chosen_longer / 2000 < 0.65  # length alone does not give the label away
    size = sum(f.stat().st_size for f in bundled_dataset_dir.rglob("*") if f.is_file())
    assert size < 1_000_000


def test_tiny_models_are_deterministic_and_load(tmp_path, tiny_model_dir, tiny_llama_no_pad_dir):
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name

    neox_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert neox_tok.pad_token == "<|padding|>" and neox_tok.eos_token == "<|endoftext|>"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    assert model.config.model_type == "gpt_neox" and model.config.hidden_size == 64

    llama_tok = AutoTokenizer.from_pretrained(tiny_llama_no_pad_dir)
    assert llama_tok.pad_token is None and llama_tok.eos_token == "</s>"
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_llama_no_pad_dir, num_labels=1)
    assert llama.config.model_type == "llama" and llama.config.pad_token_id is None
    text = "I found the service wonderful, and the view was lovely too."
    assert neox_tok.decode(neox_tok(text)["input_ids"]) == text
    assert len(neox_tok(text)["input_ids"]) < len(text) / 3  # trained merges, not bytes


# --- the default eval set ----------------------------------------------------------------------
def _hub_layout(root, splits: dict[str, list[dict]]) -> str:
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return str(root)


def _rows(n: int, tag: str) -> list[dict]:
    return [pair(f"{tag} question {i}", f"good answer {i}", f"bad answer {i}") for i in range(n)]


def test_default_eval_set_of_a_source_without_splits_is_refused(tokenizer, tmp_path):
    """A data file or a single-Dataset save_to_disk folder ignores the split name: the default
    eval set (the training mixer at --dataset_eval_splits) would be the training rows."""
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", _rows(12, "file"))
    saved = tmp_path / "saved"
    Dataset.from_list(_rows(12, "disk")).save_to_disk(str(saved))
    for source in (jsonl, str(saved)):
        with pytest.raises(DataError, match=rf"^--dataset_eval_mixer is needed: {source} has no splits"):
            build_datasets(config({source: 1.0}), tokenizer)
    # Named explicitly, the same file is what the user asked for.
    train, evaluation = build_datasets(config({jsonl: 1.0}, dataset_eval_mixer={jsonl: 1.0}), tokenizer)
    assert len(train) == len(evaluation) == 12


def test_default_eval_on_the_training_split_is_refused(tokenizer, tmp_path):
    source = _hub_layout(tmp_path / "hub", {"train": _rows(12, "train")})
    with pytest.raises(DataError, match=r"^--dataset_eval_splits: .* would be evaluated on its training split 'train'"):
        build_datasets(config({source: 1.0}, dataset_eval_splits=["train"]), tokenizer)


def test_default_eval_reads_the_whole_eval_split_not_the_training_row_count(tokenizer, tmp_path):
    source = _hub_layout(tmp_path / "hub", {"train": _rows(30, "train"), "test": _rows(10, "test")})
    train, evaluation = build_datasets(config({source: 20}), tokenizer)
    assert (len(train), len(evaluation)) == (20, 10)
    assert {row["chosen"][0]["content"] for row in evaluation} == {f"test question {i}" for i in range(10)}


def test_no_eval_set_is_loaded_without_evaluations(tokenizer, tmp_path):
    """A train-only dataset trains with --num_evals 0 (no missing 'test' split error)."""
    source = _hub_layout(tmp_path / "hub", {"train": _rows(12, "train")})
    train, evaluation = build_datasets(config({source: 1.0}, num_evals=0), tokenizer)
    assert len(train) == 12 and evaluation is None
    with pytest.raises(DataError, match=r"test"):
        build_datasets(config({source: 1.0}), tokenizer)  # evaluations asked for: the split must exist


@pytest.mark.parametrize("train_split,eval_split", [
    ("train", "train[:10%]"), ("train[:50%]", "train[25%:75%]"), ("train", "train+test"), ("train[:10]", "train[5:20]"),
    ("train[:1000]", "train[-100:]"), ("train[:50%]", "train[50%:](pct1_dropremainder)"),
])
def test_default_eval_on_rows_of_the_training_split_is_refused(train_split, eval_split):
    """datasets' split syntax: "+" joins splits, [a:b] slices rows or percentages. Rows counted
    from the end, or slices in other units or roundings, may overlap: refused too."""
    cfg = config({"org/prefs": 1.0}, dataset_train_splits=[train_split], dataset_eval_splits=[eval_split])
    with pytest.raises(DataError, match=rf"^--dataset_eval_splits: org/prefs would be evaluated on its training split "
                                        rf"'{re.escape(train_split)}' \(eval split '{re.escape(eval_split)}' shares"):
        eval_mixer(cfg)


def test_default_eval_on_a_disjoint_slice_of_the_training_split(tokenizer, tmp_path):
    source = _hub_layout(tmp_path / "hub", {"train": _rows(20, "train")})
    cfg = config({source: 1.0}, dataset_train_splits=["train[:75%]"], dataset_eval_splits=["train[-25%:]"])
    train, evaluation = build_datasets(cfg, tokenizer)
    questions = [{row["chosen"][0]["content"] for row in split} for split in (train, evaluation)]
    assert questions == [{f"train question {i}" for i in range(15)}, {f"train question {i}" for i in range(15, 20)}]
