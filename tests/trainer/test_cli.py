"""The command line: open-instruct's command lines, config files, negations, and one-line errors."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rmjob_trainer import ConfigError
from rmjob_trainer.cli import main, parse_args
from rmjob_trainer.config import RewardConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "trainer" / "rmjob_trainer" / "reward_modeling.py"

# The command lines of docs/reward_modeling.md (open-instruct), everything after `--` minus
# the launcher, verbatim.
SEED_COMMANDS = {
    "level0_debug": """
    --dataset_mixer '{"trl-internal-testing/sentiment-trl-style": 1.0}'
    --dataset_train_splits train
    --dataset_mixer '{"trl-internal-testing/sentiment-trl-style": 1.0}'
    --dataset_eval_splits test
    --model_name_or_path EleutherAI/pythia-14m
    --chat_template simple_concat_with_space
    --learning_rate 3e-6
    --per_device_train_batch_size 1
    --per_device_eval_batch_size 1
    --gradient_accumulation_steps 32
    --max_token_length 1024
    --max_prompt_token_length 1024
    --num_train_epochs 1
    --output_dir models/rm/rm
    --sanity_check
    --push_to_hub""",
    "level1_single_gpu": """
    --dataset_mixer '{"trl-internal-testing/sentiment-trl-style": 1.0}'
    --dataset_train_splits train
    --dataset_eval_mixer '{"trl-internal-testing/sentiment-trl-style": 1.0}'
    --dataset_eval_splits test
    --model_name_or_path EleutherAI/pythia-1b-deduped
    --chat_template simple_concat_with_space
    --learning_rate 3e-6
    --per_device_train_batch_size 16
    --per_device_eval_batch_size 16
    --gradient_accumulation_steps 4
    --max_token_length 1024
    --max_prompt_token_length 512
    --num_train_epochs 1
    --output_dir models/rm/rm_sentiment_1b
    --with_tracking
    --push_to_hub""",
    "level1_1_mixing": """
    --dataset_mixer '{"trl-internal-testing/sentiment-trl-style": 1.0, "ai2-adapt-dev/summarize_from_feedback_small": 1.0}'
    --dataset_train_splits train train
    --dataset_eval_mixer '{"trl-internal-testing/sentiment-trl-style": 1.0}'
    --dataset_eval_splits test
    --model_name_or_path EleutherAI/pythia-1b-deduped
    --chat_template simple_concat_with_space
    --learning_rate 3e-6
    --per_device_train_batch_size 8
    --per_device_eval_batch_size 8
    --gradient_accumulation_steps 8
    --max_token_length 1024
    --max_prompt_token_length 512
    --num_train_epochs 1
    --output_dir models/rm/rm_sentiment_1b
    --with_tracking
    --push_to_hub""",
    "level2_ds2_hh": """
    --dataset_mixer '{"trl-internal-testing/hh-rlhf-trl-style": 1.0}'
    --dataset_train_splits train
    --dataset_eval_mixer '{"trl-internal-testing/hh-rlhf-trl-style": 1.0}'
    --dataset_eval_splits test
    --model_name_or_path EleutherAI/pythia-1b-deduped
    --chat_template simple_chat
    --learning_rate 3e-6
    --per_device_train_batch_size 8
    --per_device_eval_batch_size 8
    --gradient_accumulation_steps 4
    --max_token_length 2048
    --max_prompt_token_length 1024
    --num_train_epochs 1
    --output_dir models/rm/rm_hh_1b
    --with_tracking
    --push_to_hub""",
    "level3_ultrafeedback": """
    --dataset_mixer '{"allenai/ultrafeedback_binarized_cleaned": 1.0}'
    --dataset_train_splits train_prefs
    --dataset_eval_mixer '{"allenai/ultrafeedback_binarized_cleaned": 1.0}'
    --dataset_eval_splits test_prefs
    --model_name_or_path allenai/llama-3-tulu-2-8b
    --chat_template tulu
    --learning_rate 3e-6
    --per_device_train_batch_size 1
    --per_device_eval_batch_size 1
    --gradient_accumulation_steps 32
    --max_token_length 1024
    --max_prompt_token_length 1024
    --num_train_epochs 1
    --output_dir models/rm/rm_tulu_8b
    --gradient_checkpointing
    --push_to_hub
    --with_tracking""",
}
SEED_DATASETS = [
    "trl-internal-testing/sentiment-trl-style",
    "ai2-adapt-dev/summarize_from_feedback_small",
    "trl-internal-testing/hh-rlhf-trl-style",
    "allenai/ultrafeedback_binarized_cleaned",
]
SEED_MODELS = ["EleutherAI/pythia-14m", "EleutherAI/pythia-1b-deduped", "allenai/llama-3-tulu-2-8b"]

# What each command line must mean (fields not listed keep their defaults).
SEED_EXPECTED = {
    "level0_debug": dict(
        dataset_mixer={"D0": 1.0}, dataset_train_splits=["train"], dataset_eval_mixer=None,
        dataset_eval_splits=["test"], chat_template="simple_concat_with_space", learning_rate=3e-6,
        per_device_train_batch_size=1, per_device_eval_batch_size=1, gradient_accumulation_steps=32,
        max_token_length=1024, max_prompt_token_length=1024, num_train_epochs=1, output_dir="models/rm/rm",
        sanity_check=True, push_to_hub=True, with_tracking=False,
    ),
    "level1_single_gpu": dict(
        dataset_mixer={"D0": 1.0}, dataset_eval_mixer={"D0": 1.0}, dataset_eval_splits=["test"],
        per_device_train_batch_size=16, gradient_accumulation_steps=4, max_prompt_token_length=512,
        with_tracking=True, push_to_hub=True, sanity_check=False,
    ),
    "level1_1_mixing": dict(
        dataset_mixer={"D0": 1.0, "D1": 1.0}, dataset_train_splits=["train", "train"],
        dataset_eval_mixer={"D0": 1.0}, gradient_accumulation_steps=8,
    ),
    "level2_ds2_hh": dict(
        dataset_mixer={"D2": 1.0}, chat_template="simple_chat", max_token_length=2048,
        output_dir="models/rm/rm_hh_1b",
    ),
    "level3_ultrafeedback": dict(
        dataset_train_splits=["train_prefs"], dataset_eval_splits=["test_prefs"], chat_template="tulu",
        gradient_checkpointing=True, gradient_accumulation_steps=32, with_tracking=True,
    ),
}


def localize(command: str, model_dir: Path, dataset_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Swap the seed's Hub models and datasets for local ones (distinct paths per dataset)."""
    for model in SEED_MODELS:
        command = command.replace(model, str(model_dir))
    # The same bundled data spelled four ways, so every seed dataset keeps its own mixer key.
    spellings = [f"{dataset_dir}", f"{dataset_dir}/", f"{dataset_dir}/.", f"{dataset_dir}/./"]
    for dataset, local in zip(SEED_DATASETS, spellings):
        command = command.replace(dataset, local)
    return shlex.split(command), {f"D{i}": local for i, local in enumerate(spellings)}


@pytest.mark.parametrize("level", sorted(SEED_COMMANDS))
def test_seed_command_lines_parse(level, tiny_model_dir, bundled_dataset_dir):
    argv, names = localize(SEED_COMMANDS[level], tiny_model_dir, bundled_dataset_dir)
    cfg = parse_args(argv)
    assert cfg.model_name_or_path == str(tiny_model_dir)
    for key, expected in SEED_EXPECTED[level].items():
        if isinstance(expected, dict):
            expected = {names[k]: v for k, v in expected.items()}
        assert getattr(cfg, key) == expected, key
    defaults = RewardConfig()
    untouched = {"seed", "eps", "lr_scheduler_type", "warm_up_steps", "resume", "num_evals", "exp_name"}
    assert all(getattr(cfg, k) == getattr(defaults, k) for k in untouched)


def test_repeated_flag_last_wins():
    cfg = parse_args(["--model_name_or_path", "m", "--dataset_mixer", '{"a": 1.0}', "--dataset_mixer", '{"b": 0.5}'])
    assert cfg.dataset_mixer == {"b": 0.5}


def test_mixer_counts_and_fractions():
    cfg = parse_args(["--model_name_or_path", "m", "--dataset_mixer", '{"a": 0.25, "b": 300, "c": 1}'])
    assert cfg.dataset_mixer == {"a": 0.25, "b": 300, "c": 1}


@pytest.mark.parametrize("argv, expected", [
    (["--sanity_check"], True),
    (["--sanity_check", "true"], True),
    (["--sanity_check", "False"], False),
    (["--sanity_check=yes"], True),
    (["--sanity_check", "--no_sanity_check"], False),
    (["--no_sanity_check", "--sanity_check"], True),
])
def test_bool_forms(argv, expected):
    cfg = parse_args(["--model_name_or_path", "m", "--dataset_mixer", '{"a": 1}', *argv])
    assert cfg.sanity_check is expected


def test_negation_of_default_true_flags():
    cfg = parse_args(["--model_name_or_path", "m", "--dataset_mixer", '{"a": 1}', "--no_resume",
                      "--no_hf_repo_private", "--resize_token_embeddings", "false"])
    assert (cfg.resume, cfg.hf_repo_private, cfg.resize_token_embeddings) == (False, False, False)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


YAML = """\
model_name_or_path: some/model
dataset_mixer: {"a/b": 1.0, "c.jsonl": 200}
dataset_train_splits: train
learning_rate: 3e-6        # YAML 1.1 reads this as a string; it must still be a float
gradient_checkpointing: true
resume: true
max_token_length: 512
"""


def test_config_file_and_overrides(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", YAML)
    cfg = parse_args(["--config", str(config), "--learning_rate", "1e-5", "--no_resume"])
    assert cfg.model_name_or_path == "some/model"
    assert cfg.dataset_mixer == {"a/b": 1.0, "c.jsonl": 200}
    assert cfg.dataset_train_splits == ["train"]
    assert cfg.learning_rate == 1e-5
    assert cfg.resume is False
    assert cfg.gradient_checkpointing is True
    assert cfg.max_token_length == 512
    assert parse_args(["--config", str(config)]).learning_rate == 3e-6


def test_open_instruct_positional_yaml_with_overrides(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", YAML)
    cfg = parse_args([str(config), "--seed=7", "--max_token_length=64"])
    assert (cfg.seed, cfg.max_token_length, cfg.learning_rate) == (7, 64, 3e-6)


def test_dataset_mixer_as_json_string_in_yaml(tmp_path):
    config = write_yaml(tmp_path / "run.yml", "model_name_or_path: m\ndataset_mixer: '{\"a\": 0.5}'\n")
    assert parse_args([str(config)]).dataset_mixer == {"a": 0.5}


BASE = ["--model_name_or_path", "m", "--dataset_mixer", '{"a": 1.0}']


@pytest.mark.parametrize("argv, flag, fragment", [
    (BASE + ["--not_a_flag", "1"], "--not_a_flag", "unknown flag"),
    (BASE + ["--learning", "1e-5"], "--learning", "unknown flag"),  # no prefix matching
    (BASE + ["--learning_rate", "fast"], "--learning_rate", "expected a number"),
    (BASE + ["--learning_rate", "0"], "--learning_rate", "must be > 0"),
    (BASE + ["--seed", "1.5"], "--seed", "expected an integer"),
    (BASE + ["--num_train_epochs", "0"], "--num_train_epochs", "must be >= 1"),
    (BASE + ["--max_token_length"], "--max_token_length", "expected one argument"),
    (BASE + ["--sanity_check", "maybe"], "--sanity_check", "expected true or false"),
    (BASE + ["--lr_scheduler_type", "warp"], "--lr_scheduler_type", "invalid choice"),
    (BASE + ["--invalid_rows", "ignore"], "--invalid_rows", "invalid choice"),
    (BASE + ["--chat_template", "chatml_typo"], "--chat_template", "unknown template"),
    (BASE + ["--dataset_mixer", '{"a": 1.0'], "--dataset_mixer", "invalid JSON"),
    (BASE + ["--dataset_mixer", "[1, 2]"], "--dataset_mixer", "non-empty JSON object"),
    (BASE + ["--dataset_mixer", "{}"], "--dataset_mixer", "non-empty JSON object"),
    (BASE + ["--dataset_mixer", '{"a": 1.5}'], "--dataset_mixer", "neither a fraction"),
    (BASE + ["--dataset_mixer", '{"a": 0}'], "--dataset_mixer", "neither a fraction"),
    (BASE + ["--dataset_mixer", '{"a": -3}'], "--dataset_mixer", "neither a fraction"),
    (BASE + ["--dataset_mixer", '{"a": true}'], "--dataset_mixer", "neither a fraction"),
    (BASE + ["--dataset_eval_mixer", '{"a": "all"}'], "--dataset_eval_mixer", "neither a fraction"),
    (BASE + ["--dataset_train_splits", "train", "train"], "--dataset_train_splits", "one per dataset"),
    (["--dataset_mixer", '{"a": 1.0}'], "--model_name_or_path", "is required"),
    (["--model_name_or_path", "m"], "--dataset_mixer", "is required"),
    (BASE + ["stray"], "unexpected argument", "'stray'"),
])
def test_bad_flags_raise_one_line_naming_the_flag(argv, flag, fragment):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    message = str(info.value)
    assert message.startswith(flag) and fragment in message and "\n" not in message


@pytest.mark.parametrize("text, fragment", [
    ("model_name_or_path: m\nlearning_rat: 1e-5\n", "unknown key(s) in"),
    ("model_name_or_path: [unclosed\n", "is not valid YAML (line"),
    ("- a\n- b\n", "must contain a mapping"),
    ("model_name_or_path: m\ndataset_mixer: {a: 1}\nseed: null\n", "--seed: may not be null"),
])
def test_bad_config_files(tmp_path, text, fragment):
    config = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        parse_args(["--config", str(config)])
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config: cannot read .*missing.yaml"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_main_prints_one_error_line_and_returns_2(capsys):
    assert main(BASE + ["--chat_template", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --chat_template: unknown template 'nope'") and err.count("\n") == 1


def run_cli(*args: str, entry: tuple[str, ...] = ("-m", "rmjob_trainer"), cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("args, expected", [
    (("--dataset_mixer", "{not json}"), "error: --dataset_mixer: invalid JSON"),
    (("--chat_template", "nope"), "error: --chat_template: unknown template 'nope'"),
    (("--dataset_mixer", '{"a": 2.5}'), "error: --dataset_mixer: 'a': 2.5 is neither a fraction in (0, 1]"),
])
def test_cli_subprocess_config_errors(args, expected):
    result = run_cli("--model_name_or_path", "m", "--dataset_mixer", '{"a": 1}', *args)
    assert result.returncode == 2
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr


def test_push_to_hub_without_token_fails_before_training(monkeypatch):
    """The missing token is reported at start-up, not after the run; the model is never loaded."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = run_cli("--model_name_or_path", "does/not-exist", "--dataset_mixer", '{"a": 1}', "--push_to_hub")
    assert result.returncode == 2
    assert result.stderr == "error: --push_to_hub needs a Hub write token in the HF_TOKEN environment variable\n"


def test_script_style_entry_point(tmp_path):
    """open-instruct's `python .../reward_modeling.py ...`, run from another directory."""
    result = run_cli("--help", entry=(str(SCRIPT),), cwd=tmp_path)
    assert result.returncode == 0 and "--dataset_mixer JSON" in result.stdout
    result = run_cli("--model_name_or_path", "m", "--learning_rate", "x", entry=(str(SCRIPT),), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --learning_rate: expected a number, got 'x'\n"


NO_TORCH_CHECK = """
import os, runpy, sys
def leave(status):
    raise SystemExit(status)
os._exit = leave  # where the entry (cli.run) leaves, control returns here to look
sys.argv = ["rmjob_trainer", "--help"]
try:
    runpy.run_module("rmjob_trainer", run_name="__main__")
except SystemExit as exc:
    assert exc.code == 0, exc.code
from rmjob_trainer.cli import parse_args
parse_args({argv!r})
heavy = sorted(m for m in ("torch", "transformers", "datasets", "deepspeed") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""


def test_help_and_parsing_do_not_import_torch(tiny_model_dir, bundled_dataset_dir):
    argv, _ = localize(SEED_COMMANDS["level0_debug"], tiny_model_dir, bundled_dataset_dir)
    code = NO_TORCH_CHECK.format(argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: rmjob-train" in result.stdout and "Peak learning rate" in result.stdout
    assert result.stdout.rstrip().endswith("ok")


def test_every_config_field_is_a_flag():
    from rmjob_trainer.cli import build_parser
    from rmjob_trainer.config import CONFIG_FIELDS

    flags = {a.dest for a in build_parser()._actions}
    assert set(CONFIG_FIELDS) <= flags


def test_data_errors_exit_2_with_one_line(tmp_path, tiny_model_dir):
    rows = [{"question": "q", "answer": "a"}]
    path = tmp_path / "no_columns.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    # --num_evals 0: a data file is no default eval set, which the first-run checks refuse before any data
    result = run_cli("--model_name_or_path", str(tiny_model_dir), "--dataset_mixer", json.dumps({str(path): 1.0}),
                     "--num_evals", "0", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "missing column 'chosen'" in last and "no_columns.jsonl" in last


def test_empty_after_filtering_exits_2(tmp_path, tiny_model_dir, bundled_dataset_dir):
    result = run_cli("--model_name_or_path", str(tiny_model_dir),
                     "--dataset_mixer", json.dumps({str(bundled_dataset_dir): 50}),
                     "--max_token_length", "3", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train dataset is empty after filtering with --max_token_length 3")


# run() with main() replaced: what happens after the run, in a process of its own.
PROCESS_ENTRY = """
import ctypes, logging, logging.handlers, os, signal, sys
import rmjob_trainer.cli as cli

class NativeState:  # freed by interpreter teardown, and aborting then
    def __del__(self):
        os.kill(os.getpid(), signal.SIGABRT)

def finished_run():
    global state
    state = NativeState()
    print("trained", end="")  # block-buffered: stdout is a pipe (no PYTHONUNBUFFERED)
    ctypes.CDLL(None).printf(b" natively")  # C's stdio buffer, as DeepSpeed's banners
    # flushed only by logging's atexit hook (logging.shutdown)
    logging.getLogger("rmjob").addHandler(logging.handlers.MemoryHandler(100, target=logging.StreamHandler()))
    logging.getLogger("rmjob").warning("logged")
    return {outcome}

cli.main = finished_run
cli.run()
"""


@pytest.mark.parametrize(("outcome", "status"), [("0", 0), ("None", 0), ("2", 2), ("sys.exit(200)", 200),
                                                   ("sys.exit('bad state')", 1)])
def test_a_finished_run_leaves_with_its_status_and_output_whatever_teardown_would_do(outcome, status):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", PROCESS_ENTRY.format(outcome=outcome)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == status, result.stderr
    assert result.stdout == "trained natively"
    assert "logged" in result.stderr
    assert ("bad state" in result.stderr) == (status == 1)


def test_a_rank_that_crashes_in_native_code_shows_where():
    code = "import os, rmjob_trainer.cli as cli\ndef crash():\n    os.abort()\ncli.main = crash\ncli.run()\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -6
    assert "Fatal Python error: Aborted" in result.stderr
    assert 'line 3 in crash' in result.stderr
