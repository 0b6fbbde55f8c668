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
(registered below): the model's own SDPA call run on each sequence's slice, with no mask
beyond that slice's own. Layers that declare a sliding window (``sliding_window`` passed to
the attention function: every layer of Mistral and Phi-3, the windowed layers of Qwen2/Qwen3
with ``use_sliding_window``, Gemma 3's local layers per ``layer_types``) get a per-sequence
causal window mask, as the padded path's ``create_sliding_window_causal_mask`` builds. It
behaves exactly like ``sdpa`` on ordinary (padded or unpadded) batches, so ``get_reward`` and
generation keep working on the switched model. Other implementations are used as they are.

Packing relies on every layer mixing tokens only through ``AttentionInterface`` with the
masks above; chunked, linear or recurrent layers would carry state across the packed
sequences. So it is used only for the families in ``PACKED_FAMILIES``, each checked against
per-sequence rewards in tests/trainer/test_packing.py; any other model gets padded batches
(same rewards, more compute) and one warning.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rmjob_trainer.model import backbone_of, reward_at_last_token

logger = logging.getLogger(__name__)

VARLEN_SDPA = "sdpa_varlen"
# config.model_type of the families whose packed rewards are verified to equal per-sequence
# rewards (tests/trainer/test_packing.py, sliding windows included).
PACKED_FAMILIES = ("gpt_neox", "llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3_text")


def collate_packed(sequences: list[list[int]]) -> dict:
    """Pack token-id lists into one row.

    Returns ``input_ids`` and ``position_ids`` ``[1, total]`` (positions restart at 0 for each
    sequence, as in a right-padded batch), ``seq_lens`` ``[n]``, ``cu_seq_lens`` ``[n + 1]``
    (int32 cumulative offsets, the varlen-kernel convention) and ``max_length``.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("collate_packed needs at least one sequence and no empty sequence")
    seq_lens = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return packed_batch(torch.tensor([token for s in sequences for token in s], dtype=torch.long), seq_lens)


def packed_batch(input_ids: torch.Tensor, seq_lens: torch.Tensor) -> dict:
    """``collate_packed``'s batch from the concatenated token ids ``[total]`` and the lengths."""
    cu_seq_lens = F.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32)
    # position of token t = t - (start of its sequence)
    starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), seq_lens)
    position_ids = torch.arange(len(input_ids), device=input_ids.device) - starts
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
    A model outside ``PACKED_FAMILIES`` is run on the same sequences right-padded instead.
    Raises ``ValueError`` for a model whose attention does not go through transformers'
    ``AttentionInterface`` (some remote-code models): it would ignore the sequence boundaries
    and silently attend across the packed sequences. A batch from
    ``prefix_sharing.collate_shared`` goes to ``prefix_sharing.shared_rewards``.
    """
    if "shared_pairs" in batch:
        from rmjob_trainer.prefix_sharing import shared_rewards

        return shared_rewards(model, batch)
    if not model._supports_attention_backend:
        raise ValueError(f"padding_free: {type(model).__name__} does not use transformers' attention "
                         "interface, so packed sequences would attend to each other; set padding_free "
                         "to false for this model")
    if model.config.model_type not in PACKED_FAMILIES:
        if not getattr(model, "_rmjob_padding_announced", False):
            logger.warning("padding_free: packing is not verified for %r models (verified: %s); "
                           "using padded batches instead", model.config.model_type, ", ".join(PACKED_FAMILIES))
            model._rmjob_padding_announced = True
        return _padded_rewards(model, batch)
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(VARLEN_SDPA)
    cu_seq_lens = batch["cu_seq_lens"]
    backbone = backbone_of(model)
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


def _padded_rewards(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """The packed sequences right-padded (with token 0, masked out) through the ordinary path."""
    seq_lens = batch["seq_lens"].to(batch["input_ids"].device)
    rows = batch["input_ids"][0].split(seq_lens.tolist())
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    attention_mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None] < seq_lens[:, None]
    return reward_at_last_token(model, input_ids, attention_mask)


def _segment_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """cu_seq_lens of a packed [1, total] row: a new sequence starts wherever the position does
    not follow the previous one (as ``masking_utils.find_packed_sequence_indices`` decides)."""
    positions = position_ids[0]
    is_start = torch.ones_like(positions, dtype=torch.bool)
    is_start[1:] = positions[1:] != positions[:-1] + 1
    starts = torch.nonzero(is_start).flatten()
    return torch.cat([starts, starts.new_tensor([len(positions)])])


def _window_mask(query_length: int, key_length: int, sliding_window: int, causal: bool,
                 device: torch.device) -> torch.Tensor:
    """masking_utils' window, ``[1, 1, query_length, key_length]``: a query sees keys fewer than
    ``sliding_window`` positions back (a bidirectional layer: or ahead); the queries are the last
    ``query_length`` positions of the keys."""
    queries = torch.arange(key_length - query_length, key_length, device=device)
    distance = queries[:, None] - torch.arange(key_length, device=device)[None, :]  # query - key position
    mask = distance.abs() < sliding_window
    if causal:
        mask &= distance >= 0
    return mask[None, None]


def sdpa_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``sdpa`` within each packed sequence; plain ``sdpa`` for any other batch.

    ``query/key/value`` are ``[1, heads, total, head_dim]``. A packed batch is a single row with
    no padding mask and no cache; its sequences are given by ``cu_seq_lens_q`` or, when called
    without it, found from ``position_ids`` -- so the model never silently attends across them.
    Each sequence goes through ``sdpa_attention_forward`` with everything the layer passed
    (scaling, causality, grouped-query heads, its slice of a position bias), plus a window
    mask when the layer has a ``sliding_window``.
    """
    prefix_layout = kwargs.pop("prefix_layout", None)
    if prefix_layout is not None:
        from rmjob_trainer.prefix_sharing import shared_prefix_attention

        if attention_mask is not None or query.shape[0] != 1 or position_bias is not None:
            raise ValueError("prefix_sharing: a shared-prefix row is one row with no attention mask and no "
                             "position bias")
        return shared_prefix_attention(module, query, key, value, prefix_layout, sliding_window=sliding_window,
                                       position_ids=position_ids, **kwargs)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    packed = attention_mask is None and query.shape[0] == 1 and key.shape[2] == query.shape[2]
    if packed and cu_seq_lens_q is None and position_ids is not None:
        cu_seq_lens_q = _segment_bounds(position_ids)
    if not packed or cu_seq_lens_q is None:
        if attention_mask is None and sliding_window is not None:
            # _sdpa_varlen_mask built no mask, so sdpa's window mask is built here.
            attention_mask = _window_mask(query.shape[2], key.shape[2], sliding_window, causal, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids,
                                      sliding_window=sliding_window, position_bias=position_bias, **kwargs)

    bounds = cu_seq_lens_q.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        window_mask = None
        if sliding_window is not None and end - start > sliding_window:  # a shorter one: the window hides nothing
            window_mask = _window_mask(end - start, end - start, sliding_window, causal, query.device)
        bias = None if position_bias is None else position_bias[..., start:end, start:end]
        output, _ = sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], window_mask,
            position_bias=bias, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, 1), None


def _sdpa_varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask without a padding mask (causality and boundaries are handled per sequence above,
    so the dense block-diagonal mask is never built); ``sdpa``'s mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN_SDPA, sdpa_varlen_attention)
AttentionMaskInterface.register(VARLEN_SDPA, _sdpa_varlen_mask)
