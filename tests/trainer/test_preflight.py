"""First-run mistakes through the real command line: each one is a single ``error:`` line,
exit status 2, no traceback, nothing in the output directory, and, for everything the
start-up checks catch, no data pipeline (nor torch) entered first. Plus the pieces: the
run's first line, W&B credentials as wandb itself finds them, one verdict across ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from rmjob_trainer import ConfigError
from rmjob_trainer.config import RewardConfig
from rmjob_trainer.preflight import agree, check_tracking, plan

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = REPO / "configs" / "ds_configs"
# Modules whose import means the run went past the start-up checks.
HEAVY_MODULES = ("rmjob_trainer.data", "datasets", "torch", "transformers")
# Written into a sitecustomize.py on PYTHONPATH: the child records, at exit, which heavy
# modules it imported, so a test sees whether the data pipeline was entered at all.
RECORD_IMPORTS = f"""
import atexit, json, os, sys

def _record():
    with open(os.environ["RMJOB_TEST_IMPORTS"], "w") as fh:
        json.dump([m for m in {HEAVY_MODULES!r} if m in sys.modules], fh)

atexit.register(_record)
"""
# The variables these mistakes are about; each case starts without them.
USER_ENV = ("HF_TOKEN", "HF_ENDPOINT", "WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE",
            "NETRC", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "WORLD_SIZE", "RANK")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Workspace:
    """A fresh directory per mistake: a run that writes nothing leaves ``out`` absent."""

    root: Path
    model: Path
    data: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    def file(self, name: str, text: str = "") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def base(self, **flags: str) -> list[str]:
        """A command line that would train, with ``flags`` replacing or adding flags."""
        values = {"model_name_or_path": str(self.model), "dataset_mixer": json.dumps({str(self.data): 1.0}),
                  "output_dir": str(self.out), "sanity_check_max_samples": "8", **flags}
        return ["--sanity_check", *[item for key, value in values.items() if value is not None
                                    for item in (f"--{key}", value)]]


@dataclass
class Mistake:
    name: str
    argv: Callable[[Workspace], list[str]]
    says: tuple[str, ...]  # fragments of the last line: the problem and what to do
    env: Callable[[Workspace], dict] = lambda ws: {}  # overrides; None unsets
    before_data: bool = True  # caught by the start-up checks, so no data pipeline may run
    untouched: Callable[[Workspace], Path] = lambda ws: ws.out  # must not appear or change


def _unwritable_dir(ws: Workspace) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new entries to anyone
        return Path("/sys/rmjob-out")
    locked = ws.root / "locked"
    locked.mkdir(mode=0o555)
    return locked / "out"


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _accelerate_yaml(ws: Workspace, section: str) -> str:
    return str(ws.file("accelerate.yaml", f"compute_environment: LOCAL_MACHINE\n{section}"))


MISTAKES = [
    # --- the model --------------------------------------------------------------------------
    Mistake("model_dir_typo", lambda ws: ws.base(model_name_or_path=str(ws.root / "models" / "tiny-rm-typo")),
            ("--model_name_or_path: no such directory:", "tiny-rm-typo", "check the path")),
    Mistake("model_relative_typo_offline", lambda ws: ws.base(model_name_or_path="models/tiny-rm-typo"),
            ("models/tiny-rm-typo is not a local directory and not in the Hub cache", "HF_HUB_OFFLINE is set",
             "check the path, or download the model")),
    Mistake("hub_model_without_network", lambda ws: ws.base(model_name_or_path="EleutherAI/pythia-14m"),
            ("EleutherAI/pythia-14m is not a local directory, and the Hub", "cannot be reached",
             "use a copy in the Hub cache with HF_HUB_OFFLINE=1"),
            env=lambda ws: {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}),
    Mistake("model_dir_without_config", lambda ws: ws.base(model_name_or_path=str(ws.data)),
            ("has no config.json", "give the directory that save_pretrained wrote")),
    Mistake("model_is_a_file", lambda ws: ws.base(model_name_or_path=str(ws.file("model.safetensors"))),
            ("model.safetensors is a file", "give the model directory")),
    # --- tracking and the Hub ---------------------------------------------------------------
    Mistake("tracking_without_wandb_key", lambda ws: ws.base() + ["--with_tracking"],
            ("--with_tracking needs W&B credentials", "set WANDB_API_KEY", "`wandb login`", "WANDB_MODE=offline")),
    Mistake("tracking_with_login_for_another_server", lambda ws: ws.base() + ["--with_tracking"],
            ("--with_tracking needs W&B credentials for https://wandb.example.com", "`wandb login`"),
            env=lambda ws: {"WANDB_BASE_URL": "https://wandb.example.com",
                            "NETRC": str(ws.file("netrc", f"machine api.wandb.ai login user password {'k' * 40}\n"))}),
    Mistake("wandb_key_truncated", lambda ws: ws.base() + ["--with_tracking"],
            ("the W&B key in WANDB_API_KEY is not a W&B API key (API key must have 40+ characters, has 6)",
             "https://wandb.ai/authorize"),
            env=lambda ws: {"WANDB_API_KEY": "abc123"}),
    Mistake("wandb_key_and_identity_token_file", lambda ws: ws.base() + ["--with_tracking"],
            ("both WANDB_API_KEY and WANDB_IDENTITY_TOKEN_FILE are set", "unset one of them"),
            env=lambda ws: {"WANDB_API_KEY": "k" * 40, "WANDB_IDENTITY_TOKEN_FILE": str(ws.file("token", "jwt"))}),
    Mistake("wandb_mode_typo", lambda ws: ws.base() + ["--with_tracking"],
            ("WANDB_MODE='ofline' is not a W&B mode", "use online, offline or disabled"),
            env=lambda ws: {"WANDB_MODE": "ofline"}),
    Mistake("push_to_hub_without_token", lambda ws: ws.base() + ["--push_to_hub"],
            ("--push_to_hub needs a Hub write token in the HF_TOKEN environment variable",)),
    # --- the output directory ---------------------------------------------------------------
    Mistake("output_dir_is_a_file", lambda ws: ws.base(output_dir=str(ws.file("out", "results"))),
            ("--output_dir:", "is a file, not a directory", "choose another --output_dir")),
    Mistake("output_dir_under_a_file", lambda ws: ws.base(output_dir=str(ws.file("notes.txt") / "run1")),
            ("notes.txt is a file, so", "cannot be created", "choose another --output_dir"),
            untouched=lambda ws: ws.root / "notes.txt"),
    Mistake("output_dir_dangling_symlink",
            lambda ws: ws.base(output_dir=str(_symlink(ws.out, ws.root / "unmounted-volume" / "run1"))),
            ("out is a symbolic link to", "unmounted-volume/run1, which does not exist", "choose another --output_dir"),
            untouched=lambda ws: ws.root / "unmounted-volume"),
    Mistake("output_dir_not_writable", lambda ws: ws.base(output_dir=str(_unwritable_dir(ws))),
            ("--output_dir: cannot write in", "choose a writable --output_dir")),
    # --- DeepSpeed --------------------------------------------------------------------------
    Mistake("deepspeed_file_missing", lambda ws: ws.base(deepspeed=str(ws.root / "ds_zero3.json")),
            ("--deepspeed: no such file:", "ds_zero3.json")),
    Mistake("deepspeed_json_invalid", lambda ws: ws.base(deepspeed=str(ws.file("ds.json", '{"zero_optimization": {'))),
            ("--deepspeed:", "ds.json is not valid JSON", "line 1")),
    Mistake("deepspeed_yaml_without_section",
            lambda ws: ws.base(deepspeed=_accelerate_yaml(ws, "distributed_type: MULTI_GPU\n")),
            ("accelerate.yaml is neither a DeepSpeed JSON nor an accelerate config with a deepspeed_config section",)),
    Mistake("deepspeed_is_a_directory", lambda ws: ws.base(deepspeed=str(DS_CONFIGS)),
            ("--deepspeed:", "is a directory; give a DeepSpeed JSON or an accelerate config file")),
    Mistake("deepspeed_yaml_names_missing_json",
            lambda ws: ws.base(deepspeed=_accelerate_yaml(
                ws, f"deepspeed_config:\n  deepspeed_config_file: {ws.root / 'missing.json'}\n")),
            ("deepspeed_config_file: no such file:", "missing.json")),
    Mistake("deepspeed_zero_stage_typo",
            lambda ws: ws.base(deepspeed=_accelerate_yaml(ws, "deepspeed_config:\n  zero_stage: three\n")),
            ("zero_stage must be 0, 1, 2 or 3, got 'three'",)),
    Mistake("deepspeed_batch_size_disagrees_with_flags",
            lambda ws: ws.base(deepspeed=str(ws.file("ds.json", '{"train_micro_batch_size_per_gpu": 4}'))),
            ("train_micro_batch_size_per_gpu 4 (the trainer's: --per_device_train_batch_size 1)",
             'set these keys to "auto", drop them, or make them agree')),
    Mistake("lora_with_zero3", lambda ws: ws.base(deepspeed=str(DS_CONFIGS / "deepspeed_zero3.yaml"), use_peft="true"),
            ("--use_peft does not work with ZeRO-3", "use ZeRO-2 or DDP")),
    Mistake("accelerate_env_names_missing_json", lambda ws: ws.base(),
            ("ACCELERATE_DEEPSPEED_CONFIG_FILE: no such file:", "gone.json"),
            env=lambda ws: {"ACCELERATE_USE_DEEPSPEED": "true",
                            "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ws.root / "gone.json")}),
    # --- flags and config files -------------------------------------------------------------
    Mistake("flag_typo", lambda ws: ws.base() + ["--learning_rat", "1e-5"], ("--learning_rat: unknown flag",)),
    Mistake("learning_rate_not_a_number", lambda ws: ws.base(learning_rate="3e-6x"),
            ("--learning_rate: expected a number, got '3e-6x'",)),
    Mistake("zero_batch_size", lambda ws: ws.base(per_device_train_batch_size="0"),
            ("--per_device_train_batch_size: must be >= 1, got 0",)),
    Mistake("chat_template_typo", lambda ws: ws.base(chat_template="simple_chatt"),
            ("--chat_template: unknown template 'simple_chatt' (choose from",)),
    Mistake("model_flag_missing", lambda ws: ws.base(model_name_or_path=None),
            ("--model_name_or_path: is required",)),
    Mistake("config_file_missing", lambda ws: ws.base(config=str(ws.root / "run.yaml")),
            ("--config: cannot read", "run.yaml")),
    # --- the default eval set: names only, so before any data -------------------------------
    Mistake("default_eval_set_is_the_training_file",
            lambda ws: ws.base(dataset_mixer=json.dumps({str(ws.file("prefs.jsonl", "{}\n")): 1.0})),
            ("--dataset_eval_mixer is needed:", "prefs.jsonl has no splits", "would be the training rows")),
    Mistake("default_eval_split_slices_the_training_split", lambda ws: ws.base(dataset_eval_splits="train[:10%]"),
            ("--dataset_eval_splits:", "would be evaluated on its training split 'train' (eval split 'train[:10%]'",
             "give --dataset_eval_mixer")),
    # --- the data (found once it is read, still before the model and any output) ------------
    Mistake("unknown_split", lambda ws: ws.base(dataset_train_splits="tran"),
            ("cannot load", "[tran]"), before_data=False),
    Mistake("dataset_path_typo",  # --num_evals 0: a data file is no default eval set (refused before any data)
            lambda ws: ws.base(dataset_mixer=json.dumps({str(ws.root / "pairs.jsonl"): 1.0}), num_evals="0"),
            ("cannot load", "pairs.jsonl"), before_data=False),
    Mistake("everything_filtered_out", lambda ws: ws.base(max_token_length="3"),
            ("the train dataset is empty after filtering with --max_token_length 3",), before_data=False),
]


@pytest.fixture(scope="module")
def import_recorder(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("record_imports")
    (directory / "sitecustomize.py").write_text(RECORD_IMPORTS)
    return directory


def run_cli(ws: Workspace, argv: list[str], env: dict, import_recorder: Path) -> tuple[subprocess.CompletedProcess,
                                                                                      list[str]]:
    imports_file = ws.root / "imports.json"
    full_env = {k: v for k, v in os.environ.items() if k not in USER_ENV}
    full_env.update(HOME=str(ws.root / "home"), HF_HUB_CACHE=str(ws.root / "hub-cache"),
                    PYTHONPATH=os.pathsep.join(filter(None, (str(import_recorder), os.environ.get("PYTHONPATH")))),
                    RMJOB_TEST_IMPORTS=str(imports_file))
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    result = subprocess.run([sys.executable, "-m", "rmjob_trainer", *argv], capture_output=True, text=True,
                            env=full_env, cwd=ws.root, timeout=300)
    return result, json.loads(imports_file.read_text())


def snapshot(path: Path) -> object:
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_user_mistake_is_one_line_before_any_work(mistake: Mistake, tmp_path, tiny_model_dir, bundled_dataset_dir,
                                                  import_recorder):
    ws = Workspace(tmp_path, tiny_model_dir, bundled_dataset_dir)
    (tmp_path / "home").mkdir()
    argv, env = mistake.argv(ws), mistake.env(ws)
    watched = mistake.untouched(ws)
    before = snapshot(watched)

    result, imported = run_cli(ws, argv, env, import_recorder)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in mistake.says:
        assert fragment in last, (fragment, last)
    assert snapshot(watched) == before, f"{watched} changed"
    if mistake.before_data:
        assert result.stderr.count("\n") == 1 and result.stdout == "", output  # nothing else happened
        assert imported == [], f"the start-up checks let the run import {imported}"


@pytest.mark.parametrize("flag", ["output_dir", "model_name_or_path"])
def test_a_path_under_a_directory_the_user_may_not_enter_is_one_line(flag, tmp_path):
    """Path.exists() raises PermissionError there; root enters everything, so root runs the CLI as nobody."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    if as_nobody and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop privileges")
    shared = Path(tempfile.mkdtemp(prefix="rmjob-perm-"))  # tmp_path itself is private to this user
    try:
        shared.chmod(0o777)
        private = shared / "private"
        (private / "model").mkdir(parents=True)
        (private / "model" / "config.json").write_text("{}")
        private.chmod(0o700 if as_nobody else 0o000)
        paths = {"output_dir": str(shared / "out"), "model_name_or_path": str(shared / "no-model")}
        paths[flag] = str(private / ("out" if flag == "output_dir" else "model"))
        env = {k: v for k, v in os.environ.items() if k not in USER_ENV}
        env["HOME"] = str(shared)
        result = subprocess.run([*as_nobody, sys.executable, "-m", "rmjob_trainer", "--dataset_mixer", '{"d": 1.0}',
                                 *[item for key, value in paths.items() for item in (f"--{key}", value)]],
                                capture_output=True, text=True, env=env, cwd=shared, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr == (f"error: --{flag}: {paths[flag]} lies in {private}, which this user may not enter "
                                 "(permission denied); " + ("choose an --output_dir this user may write\n"
                                 if flag == "output_dir" else "give a model directory this user may read\n"))
    finally:
        private.chmod(0o700)
        shutil.rmtree(shared)


def test_the_table_has_at_least_twenty_mistakes_of_each_kind_the_issue_names():
    assert len(MISTAKES) >= 20
    names = {m.name for m in MISTAKES}
    assert {"model_dir_typo", "hub_model_without_network", "tracking_without_wandb_key", "output_dir_is_a_file",
            "push_to_hub_without_token", "unknown_split", "deepspeed_file_missing", "zero_batch_size",
            "everything_filtered_out"} <= names


def test_a_good_run_states_its_plan_first(tmp_path, tiny_model_dir, bundled_dataset_dir, import_recorder):
    ws = Workspace(tmp_path, tiny_model_dir, bundled_dataset_dir)
    (tmp_path / "home").mkdir()
    argv = ws.base(total_episodes="8", per_device_train_batch_size="2", gradient_accumulation_steps="2",
                   num_evals="0", checkpointing_steps="1", mixed_precision="no")
    result, imported = run_cli(ws, argv, {}, import_recorder)
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first == (f"plan: single cpu process, fp32; 4 pairs per step (2 per device x 2 accumulation x 1 "
                     f"process(es)), 2 steps (8 pairs); padding-free batches, shared prompts computed once; output "
                     f"{ws.out}, checkpoints every "
                     f"1 steps in {ws.out / 'checkpoints'} (keep 2); no tracking; no Hub push")
    assert (ws.out / "metrics.json").is_file() and "rmjob_trainer.data" in imported


# --- the plan --------------------------------------------------------------------------------
def test_plan_names_deepspeed_stage_offload_world_size_tracking_and_hub(tmp_path):
    cfg = RewardConfig(model_name_or_path="EleutherAI/pythia-1b-deduped", dataset_mixer={"d": 1.0},
                       per_device_train_batch_size=4, gradient_accumulation_steps=2, total_episodes=1000,
                       output_dir=str(tmp_path / "rm"), with_tracking=True, wandb_entity="team", push_to_hub=True,
                       hf_entity="org", hf_repo_private=False, mixed_precision="bf16", padding_free=False)
    env = {"WORLD_SIZE": "8", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "WANDB_MODE": "offline"}
    assert plan(cfg, env) == (
        "plan: DeepSpeed ZeRO-3 (optimizer offloaded to cpu) on 8 cpu process(es), bf16; 64 pairs per step "
        "(4 per device x 2 accumulation x 8 process(es)), 15 steps (1000 pairs); padded batches; "
        f"output {tmp_path / 'rm'}, no checkpoints; W&B team/open_instruct_internal (offline); "
        "Hub push to org/reward_modeling__EleutherAI_pythia-1b-deduped branch <run name> (public)")


@pytest.mark.parametrize("padding_free, prefix_sharing, batches", [
    (True, True, "padding-free batches, shared prompts computed once"),
    (True, False, "padding-free batches"),
    (False, True, "padded batches"),  # prefix sharing works in padding-free batches only
])
def test_plan_says_whether_shared_prompts_are_computed_once(padding_free, prefix_sharing, batches, tmp_path):
    cfg = RewardConfig(model_name_or_path="m", dataset_mixer={"d": 1.0}, padding_free=padding_free,
                       prefix_sharing=prefix_sharing, output_dir=str(tmp_path))
    assert f"; {batches}; output {tmp_path}," in plan(cfg, {})


def test_plan_reads_the_wandb_mode_where_wandb_does(tmp_path, monkeypatch):
    """`wandb offline` writes the mode into ./wandb/settings; WANDB_MODE still wins over it."""
    (tmp_path / "home").mkdir()
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = RewardConfig(model_name_or_path="m", dataset_mixer={"d": 1.0}, with_tracking=True,
                       output_dir=str(tmp_path / "out"))
    check_tracking(cfg, {})  # offline: no credentials needed, as the plan must then say
    assert "; W&B open_instruct_internal (offline); " in plan(cfg, {})
    assert "; W&B open_instruct_internal (online); " in plan(cfg, {"WANDB_MODE": "online"})
    with pytest.raises(ConfigError, match="WANDB_MODE='' is not a W&B mode"):
        check_tracking(cfg, {"WANDB_MODE": ""})  # wandb.init would refuse it after the model loaded


@pytest.mark.parametrize("world_size, deepspeed, engine", [
    ("1", None, "single cpu process"),
    ("2", None, "DDP on 2 cpu processes"),
    ("2", "deepspeed_zero2.yaml", "DeepSpeed ZeRO-2 on 2 cpu process(es)"),
    ("1", "deepspeed_zero3.yaml", "DeepSpeed ZeRO-3 on 1 cpu process(es)"),
])
def test_plan_engine(world_size, deepspeed, engine):
    cfg = RewardConfig(model_name_or_path="m", dataset_mixer={"d": 1.0},
                       deepspeed=str(DS_CONFIGS / deepspeed) if deepspeed else None)
    assert plan(cfg, {"WORLD_SIZE": world_size}).startswith(f"plan: {engine}, fp32; ")


def test_plan_says_which_checkpoint_a_run_resumes_from(tmp_path):
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_12").mkdir()
    cfg = RewardConfig(model_name_or_path="m", dataset_mixer={"d": 1.0}, output_dir=str(tmp_path),
                       checkpointing_steps=4)
    assert f"checkpoints every 4 steps in {tmp_path / 'checkpoints'} (keep 2), resuming from step_12;" in plan(cfg, {})
    cfg.resume = False
    assert "resuming" not in plan(cfg, {})


def test_plan_says_a_finished_run_may_only_be_completed(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    cfg = RewardConfig(model_name_or_path="m", dataset_mixer={"d": 1.0}, output_dir=str(tmp_path))
    assert ("no checkpoints, or, if its metrics.json records a finished run with these settings, only completing "
            "that run (Hub push, final status);") in plan(cfg, {})
    cfg.resume = False
    assert "finished run" not in plan(cfg, {})


# --- W&B credentials: the same verdict as wandb's own lookup ---------------------------------
WANDB_VERDICT = """
import json, os
from wandb.sdk import wandb_setup
from wandb.sdk.lib.wbauth.authenticate import authenticate_session
host = wandb_setup.singleton().settings.base_url
print(json.dumps(authenticate_session(host=host, source="test", prompt=False, update_session=False) is not None))
"""


def _netrc_line(host: str) -> str:
    return f"machine {host} login user password {'k' * 40}\n"


@pytest.mark.parametrize("name, files, env, has_credentials", [
    ("nothing", {}, {}, False),
    ("api_key_env", {}, {"WANDB_API_KEY": "k" * 40}, True),
    ("wandb_login", {"home/.netrc": _netrc_line("api.wandb.ai")}, {}, True),
    ("netrc_env_var", {"auth/netrc": _netrc_line("api.wandb.ai")}, {"NETRC": "{root}/auth/netrc"}, True),
    ("login_for_another_server", {"home/.netrc": _netrc_line("wandb.example.com")}, {}, False),
    ("on_prem_base_url", {"home/.netrc": _netrc_line("wandb.example.com")},
     {"WANDB_BASE_URL": "https://wandb.example.com"}, True),
    ("wandb_login_host_saved_in_settings",
     {"home/.netrc": _netrc_line("wandb.example.com"),
      "home/.config/wandb/settings": "[default]\nbase_url = https://wandb.example.com\n"}, {}, True),
    # the workspace file (./wandb/settings, `wandb login --host` without --relogin globally) wins
    ("workspace_settings_base_url",
     {"home/.netrc": _netrc_line("wandb.example.com"),
      "work/wandb/settings": "[default]\nbase_url = https://wandb.example.com\n"}, {}, True),
    ("workspace_settings_override_global",
     {"home/.netrc": _netrc_line("api.wandb.ai"),
      "home/.config/wandb/settings": "[default]\nbase_url = https://api.wandb.ai\n",
      "work/wandb/settings": "[default]\nbase_url = https://wandb.example.com\n"}, {}, False),
    ("dot_wandb_workspace_settings",
     {"home/.netrc": _netrc_line("wandb.example.com"),
      "work/.wandb/settings": "[default]\nbase_url = https://wandb.example.com\n"}, {}, True),
])
def test_tracking_credentials_found_where_wandb_finds_them(name, files, env, has_credentials, tmp_path, monkeypatch):
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
        (tmp_path / relative).chmod(0o600)
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "work").mkdir(exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if k not in USER_ENV and not k.startswith("WANDB_")}
    child_env.update(HOME=str(tmp_path / "home"), WANDB_DIR=str(tmp_path / "wandb"),
                     **{k: v.format(root=tmp_path) for k, v in env.items()})
    wandb_says = subprocess.run([sys.executable, "-c", WANDB_VERDICT], capture_output=True, text=True,
                                env=child_env, cwd=tmp_path / "work", timeout=120)
    assert wandb_says.returncode == 0, wandb_says.stderr
    assert json.loads(wandb_says.stdout.splitlines()[-1]) is has_credentials

    cfg = RewardConfig(with_tracking=True)
    monkeypatch.setenv("HOME", child_env["HOME"])  # ~ in the default netrc and settings paths
    monkeypatch.chdir(tmp_path / "work")
    if has_credentials:
        check_tracking(cfg, child_env)
    else:
        with pytest.raises(ConfigError, match="--with_tracking needs W&B credentials"):
            check_tracking(cfg, child_env)


@pytest.mark.parametrize("mode", ["offline", "disabled", "dryrun"])
def test_tracking_offline_needs_no_credentials(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    check_tracking(RewardConfig(with_tracking=True), {"WANDB_MODE": mode})


@pytest.mark.parametrize("command", ["offline", "disabled"])
def test_wandb_offline_command_needs_no_credentials(command, tmp_path, monkeypatch):
    """`wandb offline` / `wandb disabled` write the mode into ./wandb/settings, not WANDB_MODE."""
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in USER_ENV and not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")
    subprocess.run([str(Path(sys.executable).with_name("wandb")), command], env=env, cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    assert (tmp_path / "wandb" / "settings").is_file()
    monkeypatch.setenv("HOME", env["HOME"])
    monkeypatch.chdir(tmp_path)
    check_tracking(RewardConfig(with_tracking=True), env)
    monkeypatch.chdir(tmp_path / "home")  # elsewhere the same user has no credentials
    with pytest.raises(ConfigError, match="--with_tracking needs W&B credentials"):
        check_tracking(RewardConfig(with_tracking=True), env)


# --- one verdict for all ranks ---------------------------------------------------------------
def _round(errors: list[str | None], env: dict, restart_counts: list[int] | None = None) -> list[str | None]:
    """One round of ranks (threads), each calling agree() with the launcher's environment."""
    results: list[str | None] = ["<no verdict>"] * len(errors)
    counts = restart_counts or [0] * len(errors)

    def rank(r: int) -> None:
        results[r] = agree(errors[r], {**env, "WORLD_SIZE": str(len(errors)), "RANK": str(r),
                                       "TORCHELASTIC_RESTART_COUNT": str(counts[r])})

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(errors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.fixture
def agent_store() -> Iterator[dict]:
    """What torchrun's agent hosts and tells its workers; it outlives a restart of the workers."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}


def _verdicts(errors: list[str | None]) -> list[str | None]:
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    return _round(errors, {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(store.port)})


def test_every_rank_stops_with_the_first_failing_ranks_line():
    line = "--model_name_or_path: no such directory: /models/rm"
    assert _verdicts([None, line, None]) == [f"{line} (on rank 1 of 3)"] * 3
    assert _verdicts([line, line]) == [line, line]
    assert _verdicts([None, None]) == [None, None]


def test_a_restarted_round_never_reads_an_earlier_rounds_verdicts(agent_store, monkeypatch):
    """torchrun restarts every node's workers when one fails, but only the failing node's
    TORCHELASTIC_RESTART_COUNT goes up: the ranks of round 2 disagree on it."""
    monkeypatch.setattr("rmjob_trainer.preflight.AGREE_TIMEOUT", timedelta(seconds=20))
    line = "--model_name_or_path: no such directory: /models/rm"
    assert _round([None, None], agent_store) == [None, None]
    assert _round([line, None], agent_store, restart_counts=[1, 0]) == [f"{line} (on rank 0 of 2)"] * 2
    assert _round([None, None], agent_store, restart_counts=[2, 0]) == [None, None]


def test_ranks_started_by_hand_agree_too():
    """RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT only, no agent store: rank 0 hosts the store."""
    line = "--model_name_or_path: no such directory: models/rm"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(closed_port())}
    assert _round([None, line], env) == [f"{line} (on rank 1 of 2)"] * 2


def test_a_lost_store_is_one_line_not_a_traceback(monkeypatch):
    """The agent store's host (rank 0's node) dies while rank 1 waits for its round."""
    host = subprocess.Popen([sys.executable, "-c", "from torch.distributed import TCPStore; import time; "
                             "s = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False); "
                             "print(s.port, flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    env = {"WORLD_SIZE": "2", "RANK": "1", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": host.stdout.readline().strip()}
    threading.Timer(3, host.kill).start()
    verdict = agree(None, env)
    host.wait()
    assert verdict.startswith("the start-up checks could not hear from every rank ("), verdict
    assert verdict.endswith("rank 0's process or node (MASTER_ADDR) went away or cannot be reached: look at its log")


def test_a_single_process_decides_alone():
    assert agree("x", {}) == "x" and agree(None, {"WORLD_SIZE": "2"}) is None


def _typo_model(ws: Workspace) -> tuple[list[str], str]:
    return (ws.base(model_name_or_path=str(ws.root / "typo")),
            f"error: --model_name_or_path: no such directory: {ws.root / 'typo'}; check the path")


def _default_eval_of_a_training_file(ws: Workspace) -> tuple[list[str], str]:
    data = ws.file("prefs.jsonl", "{}\n")
    return (ws.base(dataset_mixer=json.dumps({str(data): 1.0})),
            f"error: --dataset_eval_mixer is needed: {data} has no splits, so the default eval set")


def _deepspeed_batch_size_disagrees(ws: Workspace) -> tuple[list[str], str]:
    ds = ws.file("ds.json", '{"train_micro_batch_size_per_gpu": 4}')
    return (ws.base(deepspeed=str(ds)), f"error: DeepSpeed config {ds}: train_micro_batch_size_per_gpu 4 (the "
            "trainer's: --per_device_train_batch_size 1)")


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [_typo_model, _default_eval_of_a_training_file, _deepspeed_batch_size_disagrees],
                         ids=["model", "default_eval", "deepspeed_batch_size"])
def test_torchrun_ranks_stop_together_with_the_same_line(mistake, tmp_path, tiny_model_dir, bundled_dataset_dir):
    ws = Workspace(tmp_path, tiny_model_dir, bundled_dataset_dir)
    argv, line = mistake(ws)
    env = {k: v for k, v in os.environ.items() if k not in USER_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rmjob_trainer", *argv],
        capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert sum(line in row for row in result.stderr.splitlines() if row.startswith("error: ")) == 2, output
    # torchrun's own summary: both ranks exited 2 with this line, none was stopped by a signal.
    assert output.count("exitcode  : 2") == 2 and "(SIGTERM)" not in output, output
    assert output.count(f"traceback : {line}") >= 1, output
    assert not ws.out.exists()
