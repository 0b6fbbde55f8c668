"""First-run checks: every user mistake that needs no data, found before any data or model.

:func:`check` runs, in every process and before the process group exists, the checks that
cost milliseconds (output directory, DeepSpeed config, the default eval set's sources and
splits, Hub token, W&B credentials) and then the one that may touch the network (the model: a
local directory, the Hub cache or the Hub).
Each failure is a :class:`~rmjob_trainer.UserInputError` whose message names the problem and
what to do, printed by the command line as one ``error:`` line.

Under torchrun the processes may not see the same machine (a model directory present on one
node only), so :func:`agree` shares every rank's verdict through a store this round's rank 0 hosts and
all ranks stop with the same line, or none does. :func:`plan` is the run's first line: what
is about to happen, computed from the config and the launcher's environment.

Everything but :func:`plan` is torch-free.
"""

from __future__ import annotations

import configparser
import json
import math
import netrc
import os
import re
import secrets
import tempfile
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from rmjob_trainer import ConfigError, DataError
from rmjob_trainer.config import RewardConfig
from rmjob_trainer.deepspeed_config import deepspeed_base_config, deepspeed_settings

OFFLINE_HINT = "give a local model directory, or use a copy in the Hub cache with HF_HUB_OFFLINE=1"
# wandb's own modes; "dryrun" is its old name for offline, "run" for online.
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
WANDB_LOCAL_MODES = ("offline", "disabled", "dryrun")
WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"
_TRUE = ("true", "1", "yes")
# How long a rank waits for the others' verdicts: they check the same things, so only a Hub
# probe (10 s by default) makes one slower than another.
AGREE_TIMEOUT = timedelta(minutes=5)


# --- the checks ------------------------------------------------------------------------------


def check(cfg: RewardConfig, environ: Mapping[str, str] = os.environ) -> None:
    """All checks that need no data, cheapest first. Raises UserInputError on the first mistake."""
    check_output_dir(cfg)
    check_deepspeed(cfg, environ)
    if cfg.num_evals > 0:
        check_default_eval_set(cfg)
    if cfg.push_to_hub:
        from rmjob_trainer.hub import hub_token

        hub_token()
    check_tracking(cfg, environ)
    check_model(cfg)


def check_output_dir(cfg: RewardConfig) -> None:
    """The directory can be created (or exists) and is writable; nothing is left in it."""
    path = Path(cfg.output_dir)
    try:
        _check_output_dir(path)
    except PermissionError:  # Path.exists() itself fails under a directory one may not enter
        raise ConfigError(f"--output_dir: {path} lies in {_closed_ancestor(path)}, which this user may not enter "
                          "(permission denied); choose an --output_dir this user may write") from None


def _closed_ancestor(path: Path) -> Path:
    """The outermost directory above ``path`` that this user may not enter."""
    for ancestor in reversed(path.absolute().parents):
        if not os.access(ancestor, os.X_OK):
            return ancestor
    return path.absolute().parent


def _check_output_dir(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"--output_dir: {path} is a symbolic link to {os.readlink(path)}, which does not exist "
                          "(an unmounted volume?); create its target or choose another --output_dir")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir: {path} is a file, not a directory; remove it or choose another "
                          "--output_dir")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ConfigError(f"--output_dir: {existing} is a symbolic link to {os.readlink(existing)}, which "
                              "does not exist (an unmounted volume?); create its target or choose another "
                              "--output_dir")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output_dir: {existing} is a file, so {path} cannot be created; choose another "
                          "--output_dir")
    try:
        # os.access says yes to root on read-only mounts; only writing tells.
        os.rmdir(tempfile.mkdtemp(prefix=".rmjob-write-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"--output_dir: cannot write in {existing} ({exc.strerror}); choose a writable "
                          "--output_dir") from None


def _read_text(path: Path, source: str) -> str:
    if not path.exists():
        raise ConfigError(f"{source}: no such file: {path}")
    if not path.is_file():
        raise ConfigError(f"{source}: {path} is a directory; give a DeepSpeed JSON or an accelerate config file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None


def _check_deepspeed_json(path: Path, source: str) -> None:
    try:
        config = json.loads(_read_text(path, source))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                          f"{exc.colno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: {path} must hold a JSON object of DeepSpeed settings")


def check_deepspeed(cfg: RewardConfig, environ: Mapping[str, str] = os.environ) -> None:
    """The DeepSpeed config parses (:func:`_check_deepspeed_files`), and the config training
    would give DeepSpeed can be built: its batch sizes agree with the flags, no LoRA under ZeRO-3."""
    _check_deepspeed_files(cfg, environ)
    settings = deepspeed_settings(cfg, environ)
    if settings is not None:
        deepspeed_base_config(settings, cfg, int(environ.get("WORLD_SIZE", 1)))


def _check_deepspeed_files(cfg: RewardConfig, environ: Mapping[str, str]) -> None:
    """The DeepSpeed config that :func:`rmjob_trainer.deepspeed_config.deepspeed_settings` will
    read parses: ``--deepspeed`` (JSON, or an accelerate YAML with a ``deepspeed_config`` section
    and perhaps a ``deepspeed_config_file``), else accelerate's ``ACCELERATE_DEEPSPEED_CONFIG_FILE``."""
    if not cfg.deepspeed:
        config_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE and config_file:
            _check_deepspeed_json(Path(config_file), "ACCELERATE_DEEPSPEED_CONFIG_FILE")
        return
    path = Path(cfg.deepspeed)
    if path.suffix == ".json":
        _check_deepspeed_json(path, "--deepspeed")
        return
    try:
        accelerate_config = yaml.safe_load(_read_text(path, "--deepspeed"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"--deepspeed: {path} is not valid YAML{where}") from None
    section = accelerate_config.get("deepspeed_config") if isinstance(accelerate_config, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"--deepspeed: {path} is neither a DeepSpeed JSON nor an accelerate config with a "
                          "deepspeed_config section")
    if section.get("deepspeed_config_file"):
        _check_deepspeed_json(Path(section["deepspeed_config_file"]), f"--deepspeed: {path}: deepspeed_config_file")
    elif str(section.get("zero_stage", 2)) not in ("0", "1", "2", "3"):
        raise ConfigError(f"--deepspeed: {path}: zero_stage must be 0, 1, 2 or 3, got {section['zero_stage']!r}")


def has_no_splits(name: str) -> bool:
    """Sources that are a single dataset, whatever split is asked for: a .json/.jsonl/.parquet
    file or a ``save_to_disk`` folder of one Dataset."""
    return name.endswith((".json", ".jsonl", ".parquet")) or (
        Path(name).is_dir() and not (Path(name) / "dataset_dict.json").exists()
        and (Path(name) / "state.json").exists())


# One part of datasets' split syntax ("train", "train[:10%]", "test[10:-5]", "train[:20%](closest)"),
# as datasets.arrow_reader parses it; parts are joined with "+".
_SPLIT_PART = re.compile(r"^\s*(?P<split>[^\s\[\]()+]+)\s*(?:\[\s*(?:(?P<start>-?[\d_]+)(?P<start_pct>%)?)?\s*:"
                         r"\s*(?:(?P<stop>-?[\d_]+)(?P<stop_pct>%)?)?\s*\])?\s*(?:\((?P<rounding>[^)]*)\))?\s*$")
# Parts that overlap every part of their split: a whole split, and rows counted from the end
# (where they lie depends on the split's size).
_WHOLE, _UNPLACED = "whole", "unplaced"


def _split_parts(spec: str) -> list[tuple[str, str, float, float]]:
    """``spec``'s parts as (split, unit, start, stop); a part that does not parse counts as a
    whole split of that name."""
    parts = []
    for part in spec.split("+"):
        match = _SPLIT_PART.match(part)
        if match is None or match["start"] is match["stop"] is None:
            parts.append((match["split"] if match else part.strip(), _WHOLE, 0, 0))
            continue
        percent = bool(match["start_pct"] or match["stop_pct"])  # datasets: one unit per part
        start = int(match["start"] or 0)
        stop = int(match["stop"]) if match["stop"] is not None else (100 if percent else math.inf)
        if percent:
            # Negative percentages count from the end. datasets rounds every boundary alike, so
            # disjoint percentages (with the same rounding) are disjoint rows.
            start, stop = (start + 100 if start < 0 else start), (stop + 100 if stop < 0 else stop)
            parts.append((match["split"], f"% {match['rounding'] or 'closest'}", start, stop))
        elif start < 0 or stop < 0:
            parts.append((match["split"], _UNPLACED, 0, 0))
        else:
            parts.append((match["split"], "rows", start, stop))
    return parts


def _share_rows(a: tuple[str, str, float, float], b: tuple[str, str, float, float]) -> bool:
    """Whether two split parts may hold the same rows."""
    (split_a, unit_a, start_a, stop_a), (split_b, unit_b, start_b, stop_b) = a, b
    if split_a != split_b:
        return False
    return unit_a != unit_b or unit_a in (_WHOLE, _UNPLACED) or (start_a < stop_b and start_b < stop_a)


def check_default_eval_set(cfg: RewardConfig) -> None:
    """Without ``--dataset_eval_mixer`` the eval set is every training dataset at its
    ``--dataset_eval_splits`` split; a DataError when that would be training rows: a source
    without splits, or an eval split that shares a split with the training split (datasets'
    syntax: ``+`` joins splits, ``[a:b]`` slices rows or percentages; slices of one split are
    accepted only when they cannot overlap)."""
    if cfg.dataset_eval_mixer:
        return
    names = list(cfg.dataset_mixer)
    train_splits, eval_splits = cfg.dataset_train_splits, cfg.dataset_eval_splits
    for i, name in enumerate(names):
        train_split = train_splits[i] if len(train_splits) > 1 else train_splits[0]
        eval_split = eval_splits[i] if len(eval_splits) > 1 else eval_splits[0]
        if has_no_splits(name):
            raise DataError(f"--dataset_eval_mixer is needed: {name} has no splits, so the default eval set "
                            "(the training datasets at --dataset_eval_splits) would be the training rows")
        if any(_share_rows(t, e) for t in _split_parts(train_split) for e in _split_parts(eval_split)):
            raise DataError(f"--dataset_eval_splits: {name} would be evaluated on its training split "
                            f"{train_split!r} (eval split {eval_split!r} shares rows with it); name another "
                            "split or a disjoint slice, or give --dataset_eval_mixer")


def _wandb_settings(environ: Mapping[str, str], cwd: Path | None = None) -> dict[str, str]:
    """The settings wandb reads from its files, as ``wandb_setup`` merges them: the global file
    (``$WANDB_CONFIG_DIR/settings``, else ``~/.config/wandb/settings``) overridden by the
    workspace file that ``wandb offline``/``disabled``/``login --host`` write in the working
    directory (``./.wandb/settings`` if ``./.wandb`` exists, else ``./wandb/settings``).
    wandb picks the workspace file before it reads WANDB_DIR, so WANDB_DIR does not move it."""
    config_dir = environ.get("WANDB_CONFIG_DIR")
    global_file = Path(config_dir).expanduser() / "settings" if config_dir else \
        Path("~", ".config", "wandb", "settings").expanduser()
    cwd = cwd or Path.cwd()
    workspace_file = cwd / (".wandb" if (cwd / ".wandb").exists() else "wandb") / "settings"
    merged: dict[str, str] = {}
    for path in (global_file, workspace_file):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
            merged.update(parser.items("default") if parser.has_section("default") else {})
        except (OSError, UnicodeDecodeError, configparser.Error):
            continue  # wandb warns and ignores an unreadable settings file
    return merged


def wandb_mode(environ: Mapping[str, str], settings: Mapping[str, str] | None = None) -> str:
    """The mode wandb will run in: WANDB_MODE over the settings files' (``wandb offline``
    writes ``mode = offline`` in ``./wandb/settings``), else online."""
    if settings is None:
        settings = _wandb_settings(environ)
    if "WANDB_MODE" in environ:  # set but empty too: wandb refuses that as it refuses a typo
        return environ["WANDB_MODE"]
    return settings.get("mode", "online")


def _netrc_key(host: str, environ: Mapping[str, str]) -> str | None:
    path = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(os.path.expanduser(path)).authenticators(urlsplit(host).netloc)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry and entry[2] else None


def _check_wandb_key(key: str, source: str) -> None:
    """wandb.init refuses a malformed key before any network; so does this, with wandb's own rule."""
    from wandb.sdk.lib.wbauth.validation import check_api_key

    problem = check_api_key(key)
    if problem:
        raise ConfigError(f"--with_tracking: the W&B key in {source} is not a W&B API key ({problem.rstrip('.')}); "
                          "set it again from https://wandb.ai/authorize, or run `wandb login`")


def check_tracking(cfg: RewardConfig, environ: Mapping[str, str] = os.environ) -> None:
    """``--with_tracking`` has W&B credentials where wandb looks for them, or runs offline.

    Follows wandb's precedence: environment variables over the workspace settings file over
    the global one (:func:`_wandb_settings`)."""
    if not cfg.with_tracking:
        return
    settings = _wandb_settings(environ)
    mode = wandb_mode(environ, settings)
    if mode not in WANDB_MODES:
        where = "WANDB_MODE" if "WANDB_MODE" in environ else "mode in the W&B settings file"
        raise ConfigError(f"--with_tracking: {where}={mode!r} is not a W&B mode; use online, offline or disabled")
    if mode in WANDB_LOCAL_MODES:
        return
    api_key, token_file = environ.get("WANDB_API_KEY"), environ.get("WANDB_IDENTITY_TOKEN_FILE")
    if api_key and token_file:
        raise ConfigError("--with_tracking: both WANDB_API_KEY and WANDB_IDENTITY_TOKEN_FILE are set, which wandb "
                          "refuses; unset one of them")
    if token_file:
        return
    if api_key:
        _check_wandb_key(api_key, "WANDB_API_KEY")
        return
    host = environ.get("WANDB_BASE_URL") or settings.get("base_url", WANDB_DEFAULT_BASE_URL)
    key = _netrc_key(host, environ)
    if key:
        _check_wandb_key(key, environ.get("NETRC") or "~/.netrc")
        return
    if settings.get("api_key"):
        _check_wandb_key(settings["api_key"], "the W&B settings file")
        return
    raise ConfigError(f"--with_tracking needs W&B credentials for {host}: set WANDB_API_KEY, run "
                      "`wandb login`, or set WANDB_MODE=offline (sync later) or WANDB_MODE=disabled")


def check_model(cfg: RewardConfig) -> None:
    """``--model_name_or_path`` is a model directory, or a Hub model that is cached or reachable."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, HfHubHTTPError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import validate_repo_id

    name = cfg.model_name_or_path
    path = Path(name)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
        has_config = is_dir and (path / "config.json").is_file()
    except PermissionError:  # Path.is_file() itself fails under a directory one may not enter
        raise ConfigError(f"--model_name_or_path: {name} lies in {_closed_ancestor(path)}, which this user may not "
                          "enter (permission denied); give a model directory this user may read") from None
    if is_file:
        raise ConfigError(f"--model_name_or_path: {name} is a file; give the model directory (with config.json) "
                          "or a Hub model id")
    if is_dir:
        if not has_config:
            raise ConfigError(f"--model_name_or_path: {name} has no config.json; give the directory that "
                              "save_pretrained wrote, or a Hub model id")
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"--model_name_or_path: no such directory: {name}; check the path "
                          "(a Hub model id looks like org/name)") from None
    if isinstance(try_to_load_from_cache(name, "config.json", revision=cfg.model_revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--model_name_or_path: {name} is not a local directory and not in the Hub cache "
                          f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set; check the path, or download "
                          "the model with network access first")
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=cfg.model_revision))
    except GatedRepoError:
        raise ConfigError(f"--model_name_or_path: {name} is gated on the Hub; accept its terms on the Hub and "
                          "set HF_TOKEN to a token with access") from None
    except RevisionNotFoundError:
        raise ConfigError(f"--model_revision: {cfg.model_revision} is not a branch, tag or commit of "
                          f"{name}; check the revision") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"--model_name_or_path: {name} is not a local directory and not a model on the Hub "
                          f"({constants.ENDPOINT}); check the path or id (a private model needs HF_TOKEN)") from None
    except EntryNotFoundError:
        raise ConfigError(f"--model_name_or_path: the Hub repository {name} has no config.json; give a "
                          "transformers model") from None
    except HfHubHTTPError as exc:
        raise ConfigError(f"--model_name_or_path: the Hub ({constants.ENDPOINT}) answered {exc} for {name}; "
                          f"retry later, or {OFFLINE_HINT}") from None
    except Exception as exc:  # noqa: BLE001  whatever the HTTP library raises: no answer at all
        raise ConfigError(f"--model_name_or_path: {name} is not a local directory, and the Hub "
                          f"({constants.ENDPOINT}) cannot be reached ({type(exc).__name__}: {exc}); check the "
                          f"path, or {OFFLINE_HINT}") from None


# --- one verdict for all ranks ---------------------------------------------------------------


def agree(error: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """Every rank's verdict -> the run's verdict: the first failing rank's message, or None.

    Wherever the launcher set WORLD_SIZE > 1 and MASTER_ADDR/MASTER_PORT (torchrun, accelerate,
    the operator's pods, ranks started by hand). Every wait is bounded by AGREE_TIMEOUT, and a
    peer or store that goes away is a verdict too, so no rank ever goes on alone.
    """
    world_size = int(environ.get("WORLD_SIZE", 1))
    if world_size == 1 or not environ.get("MASTER_ADDR") or not environ.get("MASTER_PORT"):
        return error
    from torch.distributed import DistError

    rank = int(environ.get("RANK", 0))
    deadline = time.monotonic() + AGREE_TIMEOUT.total_seconds()
    keys = [f"{_VERDICT_PREFIX}{r}" for r in range(world_size)]
    try:
        store = _round_store(rank, environ, deadline)
        store.set(keys[rank], error or "")
        try:
            store.wait(keys, timedelta(seconds=max(deadline - time.monotonic(), 1)))
        except DistError:
            if not all(store.check([key]) for key in keys):  # a timeout, not a lost store
                missing = [str(r) for r, key in enumerate(keys) if not store.check([key])]
                return (f"rank(s) {', '.join(missing)} did not finish the start-up checks within "
                        f"{AGREE_TIMEOUT.total_seconds():.0f} s; look at their logs")
        verdicts = [store.get(key).decode() for key in keys]
        store.set(f"{_READ_PREFIX}{rank}", "")
        if rank == 0:  # the store ends with this process: not before every rank has read it
            try:
                store.wait([f"{_READ_PREFIX}{r}" for r in range(world_size)],
                           timedelta(seconds=max(deadline - time.monotonic(), 1)))
            except DistError:
                pass  # a rank that died after its verdict; the verdict stands
    except DistError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"the start-up checks could not hear from every rank ({reason}); rank 0's process or node "
                "(MASTER_ADDR) went away or cannot be reached: look at its log")
    failed = [r for r, verdict in enumerate(verdicts) if verdict]
    if not failed:
        return None
    where = "" if len(failed) == world_size else f" (on rank {', '.join(map(str, failed))} of {world_size})"
    return verdicts[failed[0]] + where


_VERDICT_PREFIX = "rmjob/preflight/verdict/"
_READ_PREFIX = "rmjob/preflight/read/"
_ROUND_STORE_KEY = "rmjob/preflight/round-store"


def _round_store(rank: int, environ: Mapping[str, str], deadline: float):
    """A store that lives exactly as long as this round's rank 0, so it holds no earlier
    round's verdicts.

    Why not keys in torchrun's agent store (at MASTER_ADDR:MASTER_PORT): it outlives a restart
    of the workers, and nothing in a worker's environment names the round identically on every
    node (TORCHELASTIC_RESTART_COUNT counts each node's own failures; a node restarted because
    another one failed keeps its count), so a rank could read an earlier round's verdicts.
    Why not the process group: its timeout is also every collective's during training, and a
    short one would break long checkpoint writes. So rank 0 hosts a fresh store and publishes
    its port and a random token in the agent store; the others take the published address only
    when that store answers with that token. An earlier round's entry points at a store that
    died with its rank 0 (all workers of a round stop before the next round starts), so it is
    never taken, only waited past. Without an agent store (ranks started by hand, accelerate
    without torchrun) rank 0 hosts the store at MASTER_PORT itself, as init_process_group later
    does (multi-tenant: the same server), and a new launch is a new store.
    """
    from torch.distributed import DistError, TCPStore

    addr, port = environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    timeout = timedelta(seconds=max(deadline - time.monotonic(), 1))
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return TCPStore(addr, port, is_master=rank == 0, multi_tenant=True, wait_for_workers=False,
                        timeout=timeout)
    agent = TCPStore(addr, port, is_master=False, timeout=timeout)
    if rank == 0:
        store = TCPStore(addr, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        token = secrets.token_hex(16)
        store.set("token", token)
        agent.set(_ROUND_STORE_KEY, f"{store.port} {token}")
        return store
    while True:
        published = agent.get(_ROUND_STORE_KEY).decode()  # waits for the first round's entry
        store_port, token = published.split()
        try:
            store = TCPStore(addr, int(store_port), is_master=False, timeout=timedelta(seconds=2))
            if store.get("token").decode() == token:
                return store
        except DistError:
            pass  # an earlier round's store, gone with its rank 0
        if time.monotonic() > deadline:
            raise DistError(f"no start-up store from this round's rank 0 within {AGREE_TIMEOUT.total_seconds():.0f} s")
        time.sleep(0.5)


# --- the plan ------------------------------------------------------------------------------


def plan(cfg: RewardConfig, environ: Mapping[str, str] = os.environ) -> str:
    """One line: engine, processes, precision, batch and steps, checkpoints, tracking, Hub.

    Uses the trainer's own functions (DeepSpeed settings, precision, checkpoints), so it says
    what train() will do; only the number of steps of an epoch-based run waits for the data.
    """
    import torch

    from rmjob_trainer.distributed import build_deepspeed_config, resolve_precision
    from rmjob_trainer.hub import repo_name
    from rmjob_trainer.train import latest_checkpoint

    world_size = int(environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    precision = resolve_precision(cfg, device)
    settings = deepspeed_settings(cfg, environ)
    if settings is not None:
        zero = build_deepspeed_config(settings, cfg, world_size, precision).get("zero_optimization", {})
        offload = [f"{what} offloaded to {zero[key]['device']}"
                   for what, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
                   if zero.get(key, {}).get("device", "none") != "none"]
        engine = f"DeepSpeed ZeRO-{zero.get('stage', 0)}" + (f" ({', '.join(offload)})" if offload else "")
        engine += f" on {world_size} {device.type} process(es)"
    elif world_size > 1:
        engine = f"DDP on {world_size} {device.type} processes"
    else:
        engine = f"single {device.type} process"
    batch_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    steps = (f"{cfg.total_episodes // batch_size} steps ({cfg.total_episodes} pairs)" if cfg.total_episodes
             else f"{cfg.num_train_epochs} epoch(s), steps counted once the data is tokenized")
    output_dir = Path(cfg.output_dir)
    checkpoints = (f"checkpoints every {cfg.checkpointing_steps} steps in {output_dir / 'checkpoints'} "
                   f"(keep {cfg.checkpoints_total_limit})" if cfg.checkpointing_steps else "no checkpoints")
    resume_from = latest_checkpoint(output_dir) if cfg.resume and output_dir.is_dir() else None
    if resume_from:
        checkpoints += f", resuming from {resume_from.name}"
    if cfg.resume and (output_dir / "metrics.json").is_file():
        # Whether that run had these settings is known once the data is tokenized (train.finished_run).
        checkpoints += (", or, if its metrics.json records a finished run with these settings, only completing "
                        "that run (Hub push, final status)")
    tracking = "no tracking"
    if cfg.with_tracking:
        where = "/".join(filter(None, (cfg.wandb_entity, cfg.wandb_project_name)))
        tracking = f"W&B {where} ({wandb_mode(environ)})"
    hub = "no Hub push"
    if cfg.push_to_hub:
        entity = cfg.hf_entity or "<HF_TOKEN's user>"
        hub = (f"Hub push to {entity}/{repo_name(cfg)} branch {cfg.hf_repo_revision or cfg.run_name or '<run name>'} "
               f"({'private' if cfg.hf_repo_private else 'public'})")
    precision_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision, "fp32")
    return (f"plan: {engine}, {precision_name}; "
            f"{batch_size} pairs per step ({cfg.per_device_train_batch_size} per device x "
            f"{cfg.gradient_accumulation_steps} accumulation x {world_size} process(es)), {steps}; "
            f"{_batches(cfg)}; output {output_dir}, {checkpoints}; "
            f"{tracking}; {hub}")


def _batches(cfg: RewardConfig) -> str:
    if not cfg.padding_free:
        return "padded batches"  # prefix sharing needs padding-free batches
    return "padding-free batches, shared prompts computed once" if cfg.prefix_sharing else "padding-free batches"
