"""Processes, and the two engines that train on them: torch DDP or DeepSpeed ZeRO.

Design: the trainer owns the process group and drives DDP or DeepSpeed itself, with no
``accelerate.Accelerator`` in between. ``torchrun``, ``accelerate launch`` and the operator's
pods all start one process per device with the same env (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), which is all we need. DeepSpeed has to be driven directly anyway
(through accelerate 1.15 on CPU, Accelerator counts 1 process where DeepSpeed sees 2), and one
explicit mechanism for both paths keeps gradient accumulation, checkpoints and saving visible:
:class:`DDPEngine` and :class:`DeepSpeedEngine` have the same small interface

    forward(batch) -> rewards     backward(loss)   (steps optimizer + scheduler every
    lr                                              gradient_accumulation_steps calls)
    save_checkpoint(dir)          load_checkpoint(dir)        save_model(dir)
    close()                       (before the process group is destroyed)

DeepSpeed is configured by ``--deepspeed`` (a DeepSpeed JSON, or an accelerate config YAML
whose ``deepspeed_config`` section :mod:`rmjob_trainer.deepspeed_config` maps) or, when absent, by the env that
``accelerate launch --config_file configs/ds_configs/deepspeed_zero3.yaml`` sets.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import get_scheduler

from rmjob_trainer.config import RewardConfig
from rmjob_trainer.deepspeed_config import deepspeed_base_config, deepspeed_settings  # noqa: F401  (train.py)
from rmjob_trainer.model import RewardModel, load_model, save_merged


# --- processes ------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(need_process_group: bool) -> Dist:
    """Join the process group the launcher described (gloo on CPU, nccl on GPU).

    A single process gets a group of one only when DeepSpeed needs it
    (``need_process_group``); plain single-process training has none.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world_size > 1 or need_process_group) and not dist.is_initialized():
        # A plain `python -m rmjob_trainer` with DeepSpeed: a group of one (DeepSpeed reads these).
        for key, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", _free_port())):
            os.environ.setdefault(key, str(value))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return Dist(rank=rank, world_size=world_size, device=device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave_distributed() -> None:
    """Tear down this rank's process group once it has no collectives left. Without it a rank
    that finishes first (not rank 0, which is still writing and pushing) can abort at
    interpreter exit ("terminate called without an active exception") while the process
    group's threads still run. No barrier: rank 0's Hub push may outlast a collective timeout."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(d: Dist):
    """Rank 0 runs the body first (filling caches, e.g. tokenized datasets), then the rest."""
    if not d.is_main:
        barrier()
    yield
    if d.is_main:
        barrier()


def resolve_precision(cfg: RewardConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. ``auto``: bf16 on CUDA devices that support it."""
    if cfg.mixed_precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]


# --- DeepSpeed configuration (torch-free parts in rmjob_trainer.deepspeed_config) -------------
def build_deepspeed_config(settings: dict, cfg: RewardConfig, world_size: int,
                           precision: torch.dtype | None) -> dict:
    """:func:`~rmjob_trainer.deepspeed_config.deepspeed_base_config` with the trainer's precision."""
    config = deepspeed_base_config(settings, cfg, world_size)
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == torch.bfloat16}
    config["fp16"] = {**config.get("fp16", {}), "enabled": precision == torch.float16}
    return config


# --- engines --------------------------------------------------------------------------------
def _optimizer(cfg: RewardConfig, module: torch.nn.Module) -> torch.optim.AdamW:
    # Frozen weights (LoRA's base model) get no optimizer state.
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _scheduler(cfg: RewardConfig, optimizer, num_training_steps: int):
    # The horizon is the run's real optimizer-step count (open-instruct multiplied it by the
    # number of epochs again, so multi-epoch runs never decayed to 0).
    return get_scheduler(cfg.lr_scheduler_type, optimizer=optimizer,
                         num_warmup_steps=cfg.warm_up_steps, num_training_steps=num_training_steps)


class DDPEngine:
    """fp32 weights, autocast for bf16/fp16 (with a loss scaler for fp16), DDP when
    world_size > 1 (gradients are all-reduced on the last micro-step only)."""

    def __init__(self, cfg: RewardConfig, tokenizer, d: Dist, num_training_steps: int):
        self.hf_model = load_model(cfg, tokenizer).to(d.device)
        self.module = RewardModel(self.hf_model, tokenizer.pad_token_id, cfg.padding_free)
        self.wrapped = (torch.nn.parallel.DistributedDataParallel(self.module) if d.world_size > 1
                        else self.module)
        self.optimizer = _optimizer(cfg, self.module)
        self.scheduler = _scheduler(cfg, self.optimizer, num_training_steps)
        self.precision = resolve_precision(cfg, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.precision == torch.float16)
        self.device = d.device
        self.grad_accum = cfg.gradient_accumulation_steps
        self.micro_step = 0
        self.is_main = d.is_main
        self.use_peft = cfg.use_peft

    def forward(self, batch: dict) -> torch.Tensor:
        last_micro_step = (self.micro_step + 1) % self.grad_accum == 0
        no_sync = self.wrapped.no_sync() if self.wrapped is not self.module and not last_micro_step \
            else contextlib.nullcontext()
        autocast = torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision is not None)
        with no_sync, autocast:
            return self.wrapped(batch).float()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()
        self.micro_step += 1
        if self.micro_step % self.grad_accum == 0:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save_checkpoint(self, path: Path) -> None:
        if self.is_main:
            torch.save({"model": self.hf_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                       path / "engine.pt")

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path / "engine.pt", map_location=self.device, weights_only=True)
        self.hf_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def save_model(self, output_dir: Path) -> None:
        if self.is_main and self.use_peft:
            save_merged(self.hf_model, output_dir)
        elif self.is_main:
            self.hf_model.save_pretrained(output_dir)

    def close(self) -> None:
        """Free the DDP wrapper, and with it its Reducer, while the process group still exists.
        A Reducer freed later (when ``train()`` returns) joins a gloo worker thread that waits
        for the GIL its destructor holds: the rank never exits."""
        self.wrapped = self.module


class DeepSpeedEngine:
    """ZeRO-2/3 through ``deepspeed.initialize``; DeepSpeed owns precision, accumulation
    boundaries, gradient clipping and the scheduler's stepping."""

    def __init__(self, cfg: RewardConfig, tokenizer, d: Dist, num_training_steps: int, settings: dict,
                 config: dict):
        import deepspeed
        import deepspeed.ops
        from transformers.integrations import HfDeepSpeedConfig

        if d.device.type == "cpu":
            # DeepSpeed's CPU shared-memory allreduce is a C++ op JIT-compiled on first use
            # (~2 min); gloo is all CPU runs (tests, demos) need. The dict is meant to be edited.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts our process group
        self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
        # While this object lives, from_pretrained loads ZeRO-3 weights already partitioned
        # (accelerate's zero3_init_flag); it must outlive the call, hence the attribute.
        self._hf_ds_config = HfDeepSpeedConfig(config) if self.zero_stage == 3 and settings.get(
            "zero3_init_flag", True) else None
        self.hf_model = load_model(cfg, tokenizer)
        module = RewardModel(self.hf_model, tokenizer.pad_token_id, cfg.padding_free)
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=_optimizer(cfg, module),
            lr_scheduler=lambda optimizer: _scheduler(cfg, optimizer, num_training_steps),
            config=config,
            dist_init_required=False,
        )
        self.is_main = d.is_main
        self.use_peft = cfg.use_peft

    def forward(self, batch: dict) -> torch.Tensor:
        return self.engine(batch).float()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        self.engine.step()  # a real step only at accumulation boundaries

    @property
    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save_checkpoint(self, path: Path) -> None:
        # Every rank writes its own shards (output_dir must be shared by all nodes).
        self.engine.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def load_checkpoint(self, path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="deepspeed")

    def close(self) -> None:
        """Release ZeRO's hooks, partitioned-parameter coordinator and buffers before the
        process group goes away."""
        self.engine.destroy()

    def save_model(self, output_dir: Path) -> None:
        """Full weights that load without DeepSpeed: under ZeRO-3 every rank takes part in
        gathering them (layer by layer, onto rank 0's CPU)."""
        if self.use_peft:
            # ZeRO-2 (ZeRO-3 is refused with LoRA) keeps every rank's weights whole and current.
            if self.is_main:
                save_merged(self.hf_model, output_dir)
            return
        if self.zero_stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state_dict = self.engine.module.state_dict() if self.is_main else None
        if self.is_main:
            prefix = "model."  # RewardModel's attribute
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
            self.hf_model.save_pretrained(output_dir, state_dict=state_dict)


def build_engine(cfg: RewardConfig, tokenizer, d: Dist, num_training_steps: int,
                 ds_settings: dict | None, ds_config: dict | None):
    if ds_settings is None:
        return DDPEngine(cfg, tokenizer, d, num_training_steps)
    return DeepSpeedEngine(cfg, tokenizer, d, num_training_steps, ds_settings, ds_config)


def engine_kind(ds_config: dict | None) -> str:
    """What writes (and can read back) a checkpoint: ``ddp`` or ``deepspeed-zero<stage>``."""
    if ds_config is None:
        return "ddp"
    return f"deepspeed-zero{ds_config.get('zero_optimization', {}).get('stage', 0)}"


# DeepSpeed config keys, besides the ZeRO stage and the batch sizes, that change the optimizer's
# steps or its state: clipping, precision and loss scaling, an optimizer or schedule of its own.
_DEEPSPEED_OPTIMIZATION_KEYS = ("gradient_clipping", "bf16", "fp16", "optimizer", "scheduler",
                                "prescale_gradients", "gradient_predivide_factor")


def deepspeed_optimization(ds_config: dict | None) -> dict | None:
    """What of a DeepSpeed config decides the optimization (None without DeepSpeed); recorded
    in checkpoints next to the trainer's flags."""
    if ds_config is None:
        return None
    zero = ds_config.get("zero_optimization", {})
    return {"offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
            "offload_param": zero.get("offload_param", {}).get("device", "none"),
            **{key: ds_config[key] for key in _DEEPSPEED_OPTIMIZATION_KEYS if key in ds_config}}
