"""Preference-data formats beyond message lists: raw Anthropic/hh-rlhf strings and TRL's
plain-text (implicit prompt) format each train to the bundled data's accuracy bar; a row
mixing formats is reported by index."""

import json
import logging

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from rmjob_trainer import DataError
from rmjob_trainer.config import RewardConfig
from rmjob_trainer.data import HH_RLHF, HH_RLHF_PROMPT, PLAIN_TEXT, build_datasets, load_mixture

PAIRS = 200  # as tests/trainer/test_train.py: 2 epochs of 25 steps of 8 pairs


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _hh(row: dict, side: str) -> str:
    prompt, reply = row[side][0]["content"], row[side][-1]["content"]
    return f"\n\nHuman: {prompt}\n\nAssistant: {reply}"


def _plain(row: dict, side: str) -> str:
    return f"{row[side][0]['content']} {row[side][-1]['content']}"


def _files(bundled_dataset_dir, root, to_text) -> tuple[str, str]:
    """The bundled pairs' first rows, both splits, rewritten as ``chosen``/``rejected`` strings."""
    return tuple(
        _write_jsonl(root / f"{split}.jsonl", [
            {"chosen": to_text(row, "chosen"), "rejected": to_text(row, "rejected")}
            for row in load_dataset(str(bundled_dataset_dir), split=split).select(range(PAIRS))])
        for split in ("train", "test"))


def _config(model_dir, files, output_dir) -> RewardConfig:
    train_file, test_file = files
    return RewardConfig(dataset_mixer={train_file: 1.0}, dataset_eval_mixer={test_file: 1.0},
                        model_name_or_path=str(model_dir), learning_rate=2e-3, per_device_train_batch_size=8,
                        per_device_eval_batch_size=50, num_train_epochs=2, num_evals=2,
                        output_dir=str(output_dir), run_name="format-test", num_proc=1)


@pytest.mark.parametrize("to_text, fmt", [(_hh, HH_RLHF), (_plain, PLAIN_TEXT)], ids=["hh-rlhf", "plain-text"])
def test_string_formats_train_to_the_bundled_accuracy_bar(tiny_model_dir, bundled_dataset_dir, tmp_path, capsys,
                                                          to_text, fmt):
    from rmjob_trainer.train import train

    files = _files(bundled_dataset_dir, tmp_path, to_text)
    metrics = train(_config(tiny_model_dir, files, tmp_path / "out"))
    out = capsys.readouterr().out
    assert f"{files[0]}[train]: format {fmt}" in out and f"{files[1]}[test]: format {fmt}" in out
    assert metrics["eval/rm/accuracy"] >= 0.9
    assert metrics["eval/rm/loss"] < 0.4


def test_hh_rlhf_strings_become_chat_messages(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away.",
    }])
    (row,) = load_mixture({path: 1.0}, ["train"]).to_list()
    turns = [{"content": "Hi there", "role": "user"}, {"content": "Hello!", "role": "assistant"},
             {"content": "How are you?", "role": "user"}]
    assert row["chosen"] == turns + [{"content": "Fine, thanks.", "role": "assistant"}]
    assert row["rejected"] == turns + [{"content": "Go away.", "role": "assistant"}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_dataset, _ = build_datasets(RewardConfig(model_name_or_path=str(tiny_model_dir), dataset_mixer={path: 1.0},
                                                   num_evals=0, num_proc=1), tokenizer)
    assert tokenizer.decode(train_dataset[0]["input_ids_chosen"]) == tokenizer.apply_chat_template(
        row["chosen"], tokenize=False)


def test_hh_rlhf_prompt_column_with_completions_becomes_chat_messages(tmp_path, capsys):
    # Dahoas/rm-static's and full-hh-rlhf's layout: the turns in `prompt`, the replies alone.
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    path = _write_jsonl(tmp_path / "hh_prompt.jsonl", [
        {"prompt": prompt, "chosen": " Fine, thanks.", "rejected": " Go away."},
        {"prompt": prompt, "chosen": " Fine.\n\nHuman: And you?", "rejected": " Go away."}])
    raw = _write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": prompt + " Fine, thanks.", "rejected": prompt + " Go away."}])
    (row,) = load_mixture({path: 1.0}, ["train"]).to_list()
    assert row == load_mixture({raw: 1.0}, ["train"]).to_list()[0]
    assert row["chosen"][0] == {"content": "Hi there", "role": "user"}
    assert f"{path}[train]: format {HH_RLHF_PROMPT}" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"row 1: chosen is an hh-rlhf conversation that does not end with an "
                                        r"'Assistant:' turn"):
        load_mixture({path: 1.0}, ["train"], invalid_rows="error")


def test_plain_text_is_tokenized_raw_with_eos_like_trl(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "text.jsonl", [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Already ends in EOS.<|endoftext|>", "rejected": "No EOS yet."},
    ])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_dataset, _ = build_datasets(RewardConfig(model_name_or_path=str(tiny_model_dir), dataset_mixer={path: 1.0},
                                                   num_evals=0, num_proc=1), tokenizer)
    eos = tokenizer.eos_token
    assert eos == "<|endoftext|>"
    first, second = train_dataset
    assert first["input_ids_chosen"] == tokenizer("The sky is blue." + eos)["input_ids"]
    assert first["input_ids_rejected"] == tokenizer("The sky is green." + eos)["input_ids"]
    assert first["input_ids_prompt"] == tokenizer("The sky is ")["input_ids"]  # the shared implicit prompt
    assert second["input_ids_chosen"] == tokenizer("Already ends in EOS." + eos)["input_ids"]  # not doubled
    assert "User:" not in tokenizer.decode(first["input_ids_chosen"])  # no chat template


def test_plain_text_and_messages_mix_across_sources(tiny_model_dir, tmp_path):
    text = _write_jsonl(tmp_path / "text.jsonl", [{"chosen": "Good text.", "rejected": "Bad text."}])
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}], "margin": 2.0}])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train_dataset, _ = build_datasets(RewardConfig(model_name_or_path=str(tiny_model_dir),
                                                   dataset_mixer={text: 1.0, chat: 1.0}, num_evals=0, num_proc=1),
                                      tokenizer)
    from_text, from_chat = train_dataset
    assert from_text["input_ids_chosen"] == tokenizer("Good text." + tokenizer.eos_token)["input_ids"]
    assert from_chat["input_ids_chosen"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}], return_dict=False)
    assert (from_text["margin"], from_chat["margin"]) == (0.0, 2.0)


MIXED_ROWS = [
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "just some text"},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
    {"chosen": "plain chosen", "rejected": "plain rejected"},
]


def test_a_row_mixing_formats_is_reported_by_index(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    with caplog.at_level(logging.WARNING, logger="rmjob_trainer.data"):
        dataset = load_mixture({path: 1.0}, ["train"])
    assert len(dataset) == 3
    dropped, formats = (r.getMessage() for r in caplog.records)
    assert f"mixed.jsonl[train]: dropping 1 invalid row(s): row 1: mixes formats: chosen is {HH_RLHF}, " \
           f"rejected is {PLAIN_TEXT}" in dropped
    # rows of different formats in one dataset: each format named with its rows' count and first row
    assert f"{HH_RLHF}: 2 row(s), first row 0; {PLAIN_TEXT}: 1 row(s), first row 3" in formats
    with pytest.raises(DataError, match=r"mixed.jsonl\[train\]: 1 invalid row\(s\): row 1: mixes formats"):
        load_mixture({path: 1.0}, ["train"], invalid_rows="error")


def test_invalid_string_rows(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        {"chosen": "fine", "rejected": "   "},
    ])
    with pytest.raises(DataError) as error:
        load_mixture({path: 1.0}, ["train"])
    message = str(error.value)
    assert "row 0: chosen is an hh-rlhf conversation that does not end with an 'Assistant:' turn" in message
    assert "row 1: chosen the last message is empty" in message
    assert "row 2: rejected empty" in message


def test_bad_margins_are_reported_by_index(tmp_path):
    chat = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}
    path = _write_jsonl(tmp_path / "margins.jsonl", [{**chat, "margin": 1.5}, {**chat, "margin": None},
                                                     {**chat, "margin": float("nan")}])
    with pytest.raises(DataError, match=r"row 1: margin missing; row 2: margin nan is not a finite number"):
        load_mixture({path: 1.0}, ["train"], invalid_rows="error")
