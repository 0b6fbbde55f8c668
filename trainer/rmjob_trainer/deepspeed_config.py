"""DeepSpeed configuration without torch: where DeepSpeed is asked for (``--deepspeed`` or
accelerate's env) and the config dict the trainer gives it, but precision.

Torch-free so that :mod:`rmjob_trainer.preflight` builds the very config training will use
and refuses its mistakes (batch sizes that disagree with the flags, LoRA under ZeRO-3) in
every rank before any process group; :func:`rmjob_trainer.distributed.build_deepspeed_config`
adds the precision.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from rmjob_trainer import ConfigError
from rmjob_trainer.config import RewardConfig

_TRUE = ("true", "1", "yes")


def _accelerate_settings(section: dict) -> dict:
    """accelerate's ``deepspeed_config`` keys -> our normalized settings (None: not set)."""
    if section.get("deepspeed_config_file"):
        return {"config_file": section["deepspeed_config_file"]}
    return {
        "zero_stage": int(section.get("zero_stage", 2)),
        "offload_optimizer_device": section.get("offload_optimizer_device") or "none",
        "offload_param_device": section.get("offload_param_device") or "none",
        "zero3_init_flag": str(section.get("zero3_init_flag", False)).lower() in _TRUE,
        "zero3_save_16bit_model": str(section.get("zero3_save_16bit_model", False)).lower() in _TRUE,
        "gradient_clipping": section.get("gradient_clipping"),
    }


def deepspeed_settings(cfg: RewardConfig, environ=os.environ) -> dict | None:
    """Where DeepSpeed is asked for, and how: ``--deepspeed`` first, then accelerate's env."""
    if cfg.deepspeed:
        path = Path(cfg.deepspeed)
        if not path.is_file():
            raise ConfigError(f"--deepspeed: no such file: {cfg.deepspeed}")
        if path.suffix == ".json":
            return {"config_file": str(path)}
        section = (yaml.safe_load(path.read_text()) or {}).get("deepspeed_config")
        if not isinstance(section, dict):
            raise ConfigError(f"--deepspeed: {cfg.deepspeed} is neither a DeepSpeed JSON nor an "
                              "accelerate config with a deepspeed_config section")
        return _accelerate_settings(section)
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in _TRUE:
        return None
    env = {
        "deepspeed_config_file": environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
        "zero_stage": environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2),
        "offload_optimizer_device": environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
        "offload_param_device": environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
        "zero3_init_flag": environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false"),
        "zero3_save_16bit_model": environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false"),
        "gradient_clipping": environ.get("ACCELERATE_GRADIENT_CLIPPING"),
    }
    return _accelerate_settings(env)


def _fill_auto(config: dict, key: str, value) -> None:
    if config.get(key, "auto") == "auto":
        config[key] = value


def _set_batch_sizes(config: dict, cfg: RewardConfig, world_size: int, config_file: str | None) -> None:
    """The trainer's batch sizes into ``config``. A DeepSpeed JSON may leave them out, say
    ``"auto"`` or repeat the same values; different values are refused, since DeepSpeed would
    then step the optimizer on its own schedule while the trainer counts and logs its own."""
    micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    wanted = {
        "train_micro_batch_size_per_gpu": (micro, f"--per_device_train_batch_size {micro}"),
        "gradient_accumulation_steps": (accumulation, f"--gradient_accumulation_steps {accumulation}"),
        "train_batch_size": (micro * accumulation * world_size,
                             f"{micro} x {accumulation} x {world_size} process(es)"),
    }
    # DeepSpeed reads null as unset, like a missing key.
    conflicts = [f"{key} {config[key]} (the trainer's: {why})" for key, (value, why) in wanted.items()
                 if config.get(key) not in (None, "auto", value)]
    if conflicts:
        raise ConfigError(f"DeepSpeed config {config_file}: {'; '.join(conflicts)}; batch sizes come from the "
                          'trainer\'s flags: set these keys to "auto", drop them, or make them agree')
    config.update({key: value for key, (value, _) in wanted.items()})


def deepspeed_base_config(settings: dict, cfg: RewardConfig, world_size: int) -> dict:
    """The dict given to ``deepspeed.initialize`` but precision: batch sizes always come from
    the trainer's flags (a JSON's ``"auto"`` values are filled the same way, and explicit batch
    sizes that disagree with the flags are a ``ConfigError``). Torch-free, so the first-run
    checks find its errors before any process group."""
    if "config_file" in settings:
        config = json.loads(Path(settings["config_file"]).read_text())
    else:
        zero = {"stage": settings["zero_stage"]}
        if settings["offload_optimizer_device"] != "none":
            zero["offload_optimizer"] = {"device": settings["offload_optimizer_device"]}
        if settings["offload_param_device"] != "none":
            zero["offload_param"] = {"device": settings["offload_param_device"]}
        if settings["zero_stage"] == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = settings["zero3_save_16bit_model"]
        config = {"zero_optimization": zero}
        if settings["gradient_clipping"] not in (None, "none"):
            config["gradient_clipping"] = float(settings["gradient_clipping"])
    if cfg.use_peft and config.get("zero_optimization", {}).get("stage") == 3:
        # Merging the adapter for the saved model needs the full weights, which ZeRO-3 partitions.
        raise ConfigError("--use_peft does not work with ZeRO-3 (the adapter is merged into the saved model); "
                          "use ZeRO-2 or DDP, whose LoRA runs need little memory anyway")
    _set_batch_sizes(config, cfg, world_size, settings.get("config_file"))
    # DeepSpeed clips at 1.0 unless told otherwise; the DDP path (and open-instruct) does not clip.
    _fill_auto(config, "gradient_clipping", 0.0)
    # Our torch AdamW also when the optimizer is offloaded (DeepSpeedCPUAdam needs a C++ build).
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 10**9)  # we log ourselves
    return config
