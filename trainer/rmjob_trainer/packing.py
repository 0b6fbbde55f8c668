"""Padding-free rewards: the sequences of a batch packed end to end in one row.

``collate_packed`` concatenates the sequences into ``input_ids`` of shape ``[1, total]`` with
``position_ids`` restarting at 0 for each sequence, and ``packed_rewards`` runs the backbone once
over that row and reads each sequence's reward at its last token. No pad token is ever embedded,
attended to or back-propagated through.

Attention must not cross sequences. What transformers 5 does with a packed row depends on the
attention implementation (checked in ``masking_utils`` / ``modeling_flash_attention_utils``):

* ``eager``, ``sdpa``, ``flex_attention``: ``create_causal_mask`` detects the restarting
  ``position_ids`` (``find_packed_sequence_indices``) when no 2D ``attention_mask`` is given and
  builds a block-diagonal causal mask. Correct, but for ``eager`` / ``sdpa`` that mask is a dense
  ``total x total`` matrix: attention then costs ``total**2`` instead of ``sum(len**2)``, slower
  than padding for long rows.
* ``flash_attention_*``: varlen kernels driven by ``cu_seq_lens_q/k`` (passed here explicitly),
  cost ``sum(len**2)``.

So for ``sdpa`` models ``packed_rewards`` switches the model, once, to ``sdpa_varlen``
(registered below): SDPA run causally on each sequence's slice, no mask materialised. It
behaves exactly like ``sdpa`` on ordinary (padded or unpadded) batches, so ``get_reward`` and
generation keep working on the switched model. Other implementations are used as they are.
GPT-NeoX (pythia) and Llama route every attention call through ``AttentionInterface`` and pass
``position_ids`` and the extra keyword arguments down to it, which is what this relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "sdpa_varlen"


def collate_packed(sequences: list[list[int]]) -> dict:
    """Pack token-id lists into one row.

    Returns ``input_ids`` and ``position_ids`` ``[1, total]`` (positions restart at 0 for each
    sequence, as in a right-padded batch), ``seq_lens`` ``[n]``, ``cu_seq_lens`` ``[n + 1]``
    (int32 cumulative offsets, the varlen-kernel convention) and ``max_length``.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("collate_packed needs at least one sequence and no empty sequence")
    seq_lens = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    cu_seq_lens = F.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32)
    input_ids = torch.tensor([token for s in sequences for token in s], dtype=torch.long)
    # position of token t = t - (start of its sequence)
    starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), seq_lens)
    position_ids = torch.arange(len(input_ids)) - starts
    return {
        "input_ids": input_ids.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "seq_lens": seq_lens,
        "cu_seq_lens": cu_seq_lens,
        "max_length": int(seq_lens.max()),
    }


def packed_rewards(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """Reward of each sequence of a ``collate_packed`` batch -> ``[n]``.

    Equal (up to float rounding) to ``model.get_reward`` on the same sequences right-padded.
    An ``sdpa`` model is switched to ``sdpa_varlen`` on first use (see the module docstring).
    Raises ``ValueError`` for a model whose attention does not go through transformers'
    ``AttentionInterface`` (some remote-code models): it would ignore the sequence boundaries
    and silently attend across the packed sequences.
    """
    if not model._supports_attention_backend:
        raise ValueError(f"padding_free: {type(model).__name__} does not use transformers' attention "
                         "interface, so packed sequences would attend to each other; set padding_free "
                         "to false for this model")
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(VARLEN_SDPA)
    cu_seq_lens = batch["cu_seq_lens"]
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
        # read by sdpa_varlen and the flash-attention varlen path; other implementations
        # find the boundaries from position_ids
        cu_seq_lens_q=cu_seq_lens,
        cu_seq_lens_k=cu_seq_lens,
        max_length_q=batch["max_length"],
        max_length_k=batch["max_length"],
    ).last_hidden_state
    last = cu_seq_lens[1:].long() - 1
    return model.score(hidden[0, last]).squeeze(-1)


def _segment_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seq_lens of a packed [1, total] row: a new sequence starts wherever the position does
    not follow the previous one (as ``masking_utils.find_packed_sequence_indices`` decides)."""
    positions = position_ids[0]
    is_start = torch.ones_like(positions, dtype=torch.bool)
    is_start[1:] = positions[1:] != positions[:-1] + 1
    starts = torch.nonzero(is_start).flatten()
    return torch.cat([starts, starts.new_tensor([len(positions)])])


def sdpa_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA, causal within each packed sequence; plain ``sdpa`` for any other batch.

    ``query/key/value`` are ``[1, heads, total, head_dim]``. A packed batch is a single row with
    no padding mask and no cache; its sequences are given by ``cu_seq_lens_q`` or, when called
    without it, found from ``position_ids`` -- so the model never silently attends across them.
    """
    packed = attention_mask is None and query.shape[0] == 1 and key.shape[2] == query.shape[2]
    if packed and cu_seq_lens_q is None and position_ids is not None:
        cu_seq_lens_q = _segment_bounds(position_ids)
    if not packed or cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, position_ids=position_ids, **kwargs)

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = cu_seq_lens_q.diff().tolist()
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


def _sdpa_varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask without a padding mask (causality and boundaries are handled per sequence above,
    so the dense block-diagonal mask is never built); ``sdpa``'s mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN_SDPA, sdpa_varlen_attention)
AttentionMaskInterface.register(VARLEN_SDPA, _sdpa_varlen_mask)
