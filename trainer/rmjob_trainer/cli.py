"""Command line and config file -> :class:`~rmjob_trainer.config.RewardConfig`.

Every RewardConfig field is a flag with open-instruct's name and meaning; the parser is
derived from the dataclass (types, ``Literal`` choices, help strings), so config.py stays the
single source of truth. Accepted forms::

    python -m rmjob_trainer --model_name_or_path EleutherAI/pythia-14m --dataset_mixer '{"d": 1.0}' ...
    rmjob-train --config run.yaml --learning_rate 1e-5        # YAML file, command line wins
    python trainer/rmjob_trainer/reward_modeling.py run.yaml --learning_rate=1e-5   # open-instruct form

Booleans take ``--flag``, ``--flag true|false`` and ``--no_flag``; lists take several values
(``--dataset_train_splits train train``); dataset mixers take a JSON object. A repeated flag
keeps its last value, as argparse does.

Everything here is torch-free: bad input is reported as one ``error: --flag: ...`` line with
exit status 2 before any heavy import.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import dataclasses
import faulthandler
import json
import math
import os
import signal
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from rmjob_trainer import ConfigError, UserInputError, preflight
from rmjob_trainer.chat_templates import CHAT_TEMPLATE_NAMES
from rmjob_trainer.config import CONFIG_FIELDS, RewardConfig

PROG = "rmjob-train"
EXIT_USER_ERROR = 2  # as argparse
YAML_SUFFIXES = (".yaml", ".yml")
MIXER_FIELDS = ("dataset_mixer", "dataset_eval_mixer")
_TRUE = {"true", "yes", "y", "1", "on"}
_FALSE = {"false", "no", "n", "0", "off"}
_HINTS = typing.get_type_hints(RewardConfig)


# --- value conversion: one path for command-line strings and YAML values ----------------


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _to_float(value: Any) -> float:
    # YAML 1.1 reads `3e-6` (no dot) as a string, so strings are parsed here too.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"expected a finite number, got {value!r}")
    return result


def _to_str(value: Any) -> str:
    if isinstance(value, (dict, list, bool)) or value is None:
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)  # YAML may read a revision like `2024` as an int


def _to_str_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected at least one value")
    return [_to_str(item) for item in items]


def _to_mixer(value: Any) -> dict[str, float]:
    """``{"dataset": fraction-or-count}``; validated here so the CLI reports bad mixers early.

    A value in (0, 1] is a fraction of the split, a whole number > 1 a row count. Unlike
    open-instruct, the JSON literal ``1`` means "all rows" (not one row): YAML and the
    Kubernetes API do not keep ``1`` and ``1.0`` apart.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg} at character {exc.pos}): {value!r}") from None
    if not isinstance(value, dict) or not value:
        raise ValueError(f'expected a non-empty JSON object like {{"dataset": 1.0}}, got {value!r}')
    for name, amount in value.items():
        is_number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
        if not (is_number and (0 < amount <= 1 or (amount > 1 and float(amount).is_integer()))):
            raise ValueError(
                f"{name!r}: {amount!r} is neither a fraction in (0, 1] nor a whole number of rows > 1"
            )
    return value


def _converter(name: str) -> Callable[[Any], Any]:
    tp = _strip_optional(_HINTS[name])
    if name in MIXER_FIELDS:
        return _to_mixer
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)

        def to_choice(value: Any) -> str:
            if value not in choices:
                raise ValueError(f"invalid choice {value!r} (choose from {', '.join(choices)})")
            return value

        return to_choice
    if typing.get_origin(tp) is list:
        return _to_str_list
    return {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}[tp]


def _convert(name: str, value: Any) -> Any:
    if value is None:
        if _is_optional(_HINTS[name]):
            return None
        raise ConfigError(f"--{name}: may not be null")
    try:
        return _converter(name)(value)
    except ValueError as exc:
        raise ConfigError(f"--{name}: {exc}") from None


# --- the argparse parser, derived from the dataclass ------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # argparse would print usage and exit; we want one line naming the flag.
        raise ConfigError(message.removeprefix("argument "))


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return " ".join(map(str, f.default_factory()))
    return str(f.default)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Train a Bradley-Terry reward model (open-instruct compatible flags).",
        epilog="A YAML config file may also be given first, open-instruct style: "
        f"{PROG} run.yaml --learning_rate=1e-5 (the command line wins).",
        argument_default=argparse.SUPPRESS,  # only flags actually given reach the namespace
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file with RewardConfig keys (snake_case); flags override it.")
    for name, f in CONFIG_FIELDS.items():
        tp = _strip_optional(_HINTS[name])
        suffix = " (required)" if f.metadata.get("required") else f" (default: {_default_text(f)})"
        help_text = f.metadata["help"].replace("%", "%%") + suffix
        if tp is bool:
            parser.add_argument(f"--{name}", nargs="?", const="true", metavar="true|false", help=help_text)
            parser.add_argument(f"--no_{name}", dest=name, action="store_const", const="false",
                                help=f"Same as --{name} false.")
        elif typing.get_origin(tp) is list:
            parser.add_argument(f"--{name}", nargs="+", metavar="VALUE", help=help_text)
        elif typing.get_origin(tp) is Literal:
            parser.add_argument(f"--{name}", metavar="{" + ",".join(typing.get_args(tp)) + "}", help=help_text)
        else:
            metavar = "JSON" if name in MIXER_FIELDS else getattr(tp, "__name__", "VALUE").upper()
            parser.add_argument(f"--{name}", metavar=metavar, help=help_text)
    return parser


# --- config files ------------------------------------------------------------------------


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML config file: a mapping of RewardConfig keys (snake_case) to values."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must contain a mapping of config keys")
    unknown = sorted(str(key) for key in data if key not in CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"--config: unknown key(s) in {path}: {', '.join(unknown)}")
    return data


# --- cross-field validation --------------------------------------------------------------


def _check_bounds(name: str, value: Any) -> None:
    meta = CONFIG_FIELDS[name].metadata
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if "minimum" in meta and value < meta["minimum"]:
        raise ConfigError(f"--{name}: must be >= {meta['minimum']}, got {value}")
    if "exclusiveMinimum" in meta and value <= meta["exclusiveMinimum"]:
        raise ConfigError(f"--{name}: must be > {meta['exclusiveMinimum']}, got {value}")


def _check_splits(cfg: RewardConfig, splits_field: str, mixer_field: str) -> None:
    mixer = getattr(cfg, mixer_field) or cfg.dataset_mixer
    splits = getattr(cfg, splits_field)
    if len(splits) not in (1, len(mixer)):
        raise ConfigError(
            f"--{splits_field}: give one split or one per dataset of --{mixer_field} "
            f"({len(mixer)}), got {len(splits)}"
        )


def validate(cfg: RewardConfig) -> RewardConfig:
    """Checks that need more than one value at a time; raises ConfigError naming the flag."""
    for name, f in CONFIG_FIELDS.items():
        value = getattr(cfg, name)
        if f.metadata.get("required") and value is None:
            raise ConfigError(f"--{name}: is required (on the command line or in the config file)")
        _check_bounds(name, value)
    if cfg.chat_template not in CHAT_TEMPLATE_NAMES:
        raise ConfigError(
            f"--chat_template: unknown template {cfg.chat_template!r} "
            f"(choose from {', '.join(CHAT_TEMPLATE_NAMES)})"
        )
    _check_splits(cfg, "dataset_train_splits", "dataset_mixer")
    _check_splits(cfg, "dataset_eval_splits", "dataset_eval_mixer")
    return cfg


# --- entry points --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> RewardConfig:
    """argv (without the program name) -> validated RewardConfig. Raises ConfigError.

    Precedence: RewardConfig defaults < config file (``--config`` or a leading ``*.yaml``)
    < command-line flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    positional_config = None
    if argv and not argv[0].startswith("-") and argv[0].endswith(YAML_SUFFIXES):
        positional_config, argv = argv[0], argv[1:]

    namespace, extras = build_parser().parse_known_args(argv)
    if extras:
        flag = extras[0]
        raise ConfigError(f"{flag}: unknown flag" if flag.startswith("-") else f"unexpected argument {flag!r}")
    flags = vars(namespace)
    config_path = flags.pop("config", None)
    if config_path and positional_config:
        raise ConfigError("--config: config file given twice (positional and --config)")
    config_path = config_path or positional_config

    raw = {**(load_config_file(config_path) if config_path else {}), **flags}
    values = {name: _convert(name, value) for name, value in raw.items()}
    return validate(RewardConfig(**values))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check, say what will happen, train. A user mistake: one ``error:`` line, exit status 2.

    The first-run checks (:mod:`rmjob_trainer.preflight`) run before any data, model or process
    group, and under torchrun all ranks stop together with the same line.
    """
    try:
        cfg = parse_args(argv)
        preflight.check(cfg)
        verdict = None
    except UserInputError as exc:
        verdict = str(exc)
    verdict = preflight.agree(verdict)
    if verdict:
        return _stop_every_rank(verdict)
    try:
        from rmjob_trainer.train import train  # heavy (torch): only once the run can start

        if os.environ.get("RANK", "0") == "0":
            print(preflight.plan(cfg), flush=True)
        train(cfg)
    except UserInputError as exc:
        _report(str(exc))
        return EXIT_USER_ERROR
    return 0


def run() -> typing.NoReturn:
    """The process entry (``rmjob-train``, ``python -m rmjob_trainer``, what torchrun starts).

    The process leaves with ``os._exit`` once :func:`main` is done, skipping the interpreter's
    teardown: by then the outputs are written and the process group destroyed, and tearing down
    torch's, gloo's and DeepSpeed's native state at exit has aborted finished ranks (SIGABRT,
    "terminate called without an active exception": ZeRO-3 in about 2 runs of 9 before
    ``engine.close()`` and ``leave_distributed()``, ZeRO-2 once in CI after them), which torchrun
    reports as a failed run (the abort's message was not captured, so the ZeRO-2 case is
    inferred). Only the native half is skipped: the atexit hooks run, and the buffered output
    of Python and of C is written.
    """
    faulthandler.enable()  # a crash in native code prints every thread's Python stack
    try:
        status = main()
    except SystemExit as exc:  # a preempted run (exit status 200), argparse's --help
        status = exc.code
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("message"), as the interpreter would print it
        print(status, file=sys.stderr)
        status = 1
    # The atexit hooks, as interpreter shutdown calls them: W&B finishing a run left open,
    # logging's handlers, temporary folders (weakref finalizers).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # native code's printf output (DeepSpeed's), held by C's stdio
    os._exit(status)


def _report(message: str) -> None:
    line = f"error: {message}"
    sys.stderr.write(line + "\n")  # one write: ranks sharing a pipe interleave print()'s two
    sys.stderr.flush()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torchrun's failure summary then shows this line instead of a pointer to its docs
        # (the format of torch.distributed.elastic's ErrorHandler.record_exception).
        Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": {
            "py_callstack": line, "timestamp": str(int(time.time()))}}}))


def _stop_every_rank(message: str) -> int:
    """The start-up verdict, the same on every rank: under torchrun all ranks leave at once."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        _report(message)
        return EXIT_USER_ERROR
    # torchrun stops the other ranks with SIGTERM as soon as it sees one exit, and an exit
    # through interpreter shutdown (which restores the default SIGTERM action) is slow enough
    # to be caught: its summary would show one failure and N-1 signals instead of N times
    # this status. Leaving at once, SIGTERM included, keeps every rank's status.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_USER_ERROR))
    _report(message)
    sys.stdout.flush()
    os._exit(EXIT_USER_ERROR)
