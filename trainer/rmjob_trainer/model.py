"""The reward model: a sequence-classification LM with one output, and its reward.

Implementation details from open-instruct (see its reward-modeling docs):

1. The reward is read at each sequence's true last token (the EOS that every chat template
   appends), found from the sequence lengths, never from the pad id: a pad token equal to EOS
   (Llama 3 style tokenizers) or left padding cannot move it. The trainer still gives its
   tokenizer a pad token distinct from EOS, so a saved model also works with transformers' own
   ``forward``, which finds the last token by the pad id.
2. Dropout disabled (p. 3 of https://arxiv.org/abs/1909.08593).
3. Score head initialised ``normal(std=1/sqrt(hidden_size + 1))``, bias zero
   (p. 11 of https://arxiv.org/abs/2009.01325). Under ZeRO-3 the head is partitioned, so it is
   gathered first; otherwise the initialisation would write into an empty shard and be lost.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from rmjob_trainer import ConfigError
from rmjob_trainer.config import RewardConfig

PAD_TOKEN = "[PAD]"  # what open-instruct adds to tokenizers that lack one


def load_tokenizer(cfg: RewardConfig):
    """Right-padding tokenizer with a pad token != EOS (data.build_datasets sets the chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.model_name_or_path, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code
    )
    tokenizer.padding_side = "right"
    # pad == eos (a common fallback) would hide the EOS the reward is read at.
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def _config_without_dropout(cfg: RewardConfig):
    config = AutoConfig.from_pretrained(
        cfg.model_name_or_path, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code,
        num_labels=1,
    )
    # Zero every dropout knob (hidden_dropout, attention_dropout, classifier_dropout, ...): some
    # models apply functional dropout with these values, which no module swap would catch.
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, key, 0.0)
    return config


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _maybe_gathered(params: list[nn.Parameter]):
    """Full parameters for modification on rank 0 when ZeRO-3 partitioned them, else a no-op."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def init_score_head(model: PreTrainedModel) -> None:
    score = model.score
    params = [p for p in (score.weight, getattr(score, "bias", None)) if p is not None]
    with _maybe_gathered(params), torch.no_grad():
        # Outside ZeRO-3 every rank runs this with the same seed; under it only rank 0's
        # values count (modifier_rank=0) and are re-partitioned on exit.
        nn.init.normal_(score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        if score.bias is not None:
            score.bias.zero_()


def load_model(cfg: RewardConfig, tokenizer) -> PreTrainedModel:
    """``AutoModelForSequenceClassification(num_labels=1)`` ready for reward training.

    Under ZeRO-3 with ``zero3_init_flag`` the caller keeps a ``HfDeepSpeedConfig`` alive, so
    ``from_pretrained`` loads the weights already partitioned.
    """
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model_name_or_path,
        config=_config_without_dropout(cfg),
        revision=cfg.model_revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch.float32,  # master weights; bf16 comes from autocast or DeepSpeed
        **kwargs,
    )
    if cfg.resize_token_embeddings and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # Multiple of 8 for tensor cores (as open-instruct). resize gathers under ZeRO-3 itself.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    init_score_head(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with DDP's no_sync and with inputs that need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft:
        model = add_lora(model, cfg)
    return model


def add_lora(model: PreTrainedModel, cfg: RewardConfig):
    """LoRA adapters on ``cfg.lora_target_modules``, everything else frozen except a full,
    trainable copy of the score head (``modules_to_save``): a new head trained only through a
    low-rank update would start from, and stay near, its random initialisation.

    The returned ``PeftModel`` forwards attribute access to the model, so the reward functions
    below use it unchanged."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = cfg.lora_target_modules
    if targets == ["all-linear"]:  # peft takes it only as the whole value, not as a name in a list
        targets = "all-linear"
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets, modules_to_save=["score"])
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # no default targets for this architecture, or none of the names match
        first_line = str(e).strip().splitlines()[0]
        raise ConfigError(f"--lora_target_modules {cfg.lora_target_modules or '(default)'}: {first_line} "
                          f"(model type {model.config.model_type!r}; name its linear layers, or "
                          "'all-linear')") from None


def save_merged(model, output_dir) -> None:
    """``output_dir``: a plain model (LoRA merged into the weights, the trained head in place of
    the original); ``output_dir/adapter``: the adapter alone. Merging rewrites ``model`` in place,
    so this comes last.

    Half-precision weights (DeepSpeed bf16/fp16 keeps the model in them) are merged and saved in
    fp32, on the CPU: W + BA rounded back to bf16 loses much of an update that is small next to W
    (about 5% of its effect on the rewards, measured on a tiny model). That costs 4 bytes per
    parameter of host memory on this rank, for the moment of the save."""
    model.save_pretrained(Path(output_dir) / "adapter")
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        model.to("cpu", torch.float32)
    model.merge_and_unload().save_pretrained(output_dir)


def get_reward(model: PreTrainedModel, input_ids: torch.Tensor, pad_token_id: int,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reward of each padded sequence of ``input_ids`` [batch, seq] -> [batch], read at its
    last real token.

    ``attention_mask`` marks the real tokens (left or right padding). Without it the real tokens
    are taken to be those that are not ``pad_token_id``, which is refused when the pad id is the
    model's EOS: the EOS a sequence ends with would be taken for padding. Pad ids are replaced by
    0 before the embedding, so a pad token the embedding matrix lacks is harmless.
    """
    if attention_mask is None:
        eos = model.config.eos_token_id
        if pad_token_id in (eos if isinstance(eos, list) else [eos]):
            raise ValueError(f"get_reward: pad_token_id {pad_token_id} is the EOS token, so padding cannot be "
                             "told from a sequence's final EOS; pass attention_mask")
        attention_mask = input_ids != pad_token_id
    attention_mask = attention_mask.bool()
    return reward_at_last_token(model, input_ids.masked_fill(~attention_mask, 0), attention_mask)


def padded_batch(sequences: list[list[int]], pad_token_id: int) -> dict:
    """Right-padded ``input_ids`` and the ``attention_mask`` of the real tokens, from the lengths."""
    longest = max(map(len, sequences))
    return {"input_ids": torch.tensor([s + [pad_token_id] * (longest - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[True] * len(s) + [False] * (longest - len(s)) for s in sequences])}


def reward_at_last_token(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each row of ``input_ids`` [batch, seq] whose real tokens are ``attention_mask``
    (one contiguous run per row, left or right padded) -> [batch].

    Runs the backbone and applies ``model.score`` to its last hidden state only (no
    ``output_hidden_states`` for every layer).
    """
    attention_mask = attention_mask.bool()
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    backbone = backbone_of(model)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    columns = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = torch.where(attention_mask, columns, -1).max(1).values  # the last real token, either side
    last_hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    return model.score(last_hidden).squeeze(-1)


def backbone_of(model) -> nn.Module:
    """The transformer under the score head. Through a LoRA ``PeftModel`` to the model it wraps:
    on the ``PeftModel`` itself, the attribute named by ``base_model_prefix`` can be peft's own
    (Llama's prefix is ``model``, which peft's ``LoraModel`` uses for the whole wrapped model)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


class RewardModel(nn.Module):
    """What DDP / DeepSpeed wrap: their hooks only run when the wrapper's ``forward`` is called,
    and the reward is not the HF model's own ``forward``. ``batch`` is either padded
    ``{"input_ids", "attention_mask"}`` (:func:`padded_batch`) or a packed batch from :mod:`rmjob_trainer.packing`."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int, padding_free: bool = False):
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def forward(self, batch: dict) -> torch.Tensor:
        if self.padding_free:
            from rmjob_trainer.packing import packed_rewards

            return packed_rewards(self.model, batch)
        return get_reward(self.model, batch["input_ids"], self.pad_token_id, batch["attention_mask"])
