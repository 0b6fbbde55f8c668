"""The reward model: a sequence-classification LM with one output, and its reward.

Implementation details from open-instruct (see its reward-modeling docs):

1. Right padding, and a pad token distinct from EOS: the reward is read at the last non-pad
   token, which is the EOS that every chat template appends.
2. Dropout disabled (p. 3 of https://arxiv.org/abs/1909.08593).
3. Score head initialised ``normal(std=1/sqrt(hidden_size + 1))``, bias zero
   (p. 11 of https://arxiv.org/abs/2009.01325). Under ZeRO-3 the head is partitioned, so it is
   gathered first; otherwise the initialisation would write into an empty shard and be lost.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

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
    return model


def get_reward(model: PreTrainedModel, input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Reward of each right-padded sequence of ``input_ids`` [batch, seq], read at its last
    non-pad token -> [batch].

    Pad ids are replaced by 0 before the embedding, so a pad token the embedding matrix lacks
    (``resize_token_embeddings=False``) is harmless.
    """
    attention_mask = input_ids != pad_token_id
    return reward_at_last_token(model, input_ids.masked_fill(~attention_mask, 0), attention_mask)


def reward_at_last_token(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each right-padded row of ``input_ids`` [batch, seq] whose real tokens are
    ``attention_mask`` (a prefix of each row) -> [batch].

    Runs the backbone and applies ``model.score`` to its last hidden state only (no
    ``output_hidden_states`` for every layer).
    """
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    last = attention_mask.long().sum(1) - 1  # right padding: non-pad tokens are a prefix
    last_hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    return model.score(last_hidden).squeeze(-1)


class RewardModel(nn.Module):
    """What DDP / DeepSpeed wrap: their hooks only run when the wrapper's ``forward`` is called,
    and the reward is not the HF model's own ``forward``. ``batch`` is either padded
    ``{"input_ids"}`` or a packed batch from :mod:`rmjob_trainer.packing`."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int, padding_free: bool = False):
        super().__init__()
        self.model = model
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def forward(self, batch: dict) -> torch.Tensor:
        if self.padding_free:
            from rmjob_trainer.packing import packed_rewards

            return packed_rewards(self.model, batch)
        return get_reward(self.model, batch["input_ids"], self.pad_token_id)
