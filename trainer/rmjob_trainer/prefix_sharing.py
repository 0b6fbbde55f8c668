"""Prefix sharing: each preference pair's common prefix is computed once.

A pair's chosen and rejected token ids usually begin alike (the prompt; in multi-turn data most
of the conversation). ``collate_shared`` packs pair ``i`` into the padding-free row as

    [P_i C_i] [R_i]

with ``P`` the longest common prefix of the two id lists and ``C``, ``R`` what follows it in the
chosen and the rejected sequence. Positions: ``P`` 0..p-1, and both ``C`` and ``R`` continue from
``p``, as in their own sequences. Attention: ``[P C]`` is the chosen sequence itself (causal);
``R`` attends to ``P`` and causally to itself, never to ``C``. Every token so sees exactly the
tokens, at the positions, it sees in its own sequence: the rewards are those of unshared
packing, and so are the gradients (``P``'s activations feed both sequences, so their gradient
is the sum of both, as when ``P`` is computed twice). The chosen reward is read at the last
token of ``[P C]``, the rejected one at the last token of ``R``, or of ``P`` when ``R`` is empty
(the rejected sequence is a prefix of the chosen one, or equal to it).

The layout reaches every attention layer as the ``prefix_layout`` keyword argument (so
recomputation under gradient checkpointing sees it too) of the ``sdpa_varlen`` attention
(packing.py), which hands it to :func:`shared_prefix_attention`:

* SDPA per segment (CPU, and the GPU fallback): ``[P C]`` with ``is_causal``, ``R`` against the
  keys ``[P R]`` with a causal mask aligned to the last key (and the layer's sliding window).
  On CPU this is faster than one SDPA call per pair over ``[P C R]`` with a block mask, which
  also computes the masked ``R x C`` scores (bench/prefix_attention.py, docs/benchmarks.md).
* flash-attention varlen (CUDA, fp16/bf16, flash-attn >= 2.1 installed): keys and values
  gathered into ``[P C] [P R]`` per pair (a copy of ``P``'s keys, not a recomputation) and one
  varlen call with ``causal=True``, which flash-attention aligns to the last key when a
  segment has more keys than queries.

Correct only where the sequence a token belongs to is given by attention alone and its position
by ``position_ids`` alone: the rotary families of ``packing.PACKED_FAMILIES`` (learned absolute
positions such as GPT-2's would also follow ``position_ids``, but are not verified, so such
models get padded batches as for packing). Models outside those families, models without
transformers' attention interface, and attention implementations other than sdpa and
flash-attention (eager, flex) get the same pairs unshared, through :func:`packed_rewards`, with
one warning.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rmjob_trainer.model import backbone_of
from rmjob_trainer.packing import PACKED_FAMILIES, VARLEN_SDPA, _window_mask, packed_batch, packed_rewards

logger = logging.getLogger(__name__)

SHARING_IMPLEMENTATIONS = ("sdpa", VARLEN_SDPA, "flash_attention_2", "flash_attention_3")


class PrefixLayout(NamedTuple):
    """Where each query segment of the row finds its keys (see the module docstring).

    ``segments``: per segment ``(start, end, prefix_start, prefix_len)``: queries and own keys
    ``row[start:end]``, preceded by the keys ``row[prefix_start:prefix_start + prefix_len]``.
    ``kv_index``, ``cu_seq_lens_q/k``, ``max_length_q/k``: the same as a flash-attention varlen
    call sees it (keys gathered by ``kv_index``). ``flash``: the flash-attention implementation
    to use on CUDA, or None.
    """

    segments: list[tuple[int, int, int, int]]
    kv_index: torch.Tensor
    cu_seq_lens_q: torch.Tensor
    cu_seq_lens_k: torch.Tensor
    max_length_q: int
    max_length_k: int
    flash: str | None


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def collate_shared(chosen: list[list[int]], rejected: list[list[int]]) -> dict:
    """Pairs packed into one row, each common prefix once.

    Returns ``input_ids`` and ``position_ids`` ``[1, total]``, the layout (``prefix_segments``,
    ``kv_index``, ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``),
    ``reward_index`` ``[2n]`` (where each chosen, then each rejected reward is read) and, to
    rebuild the unshared sequences, ``sequence_index`` and ``seq_lens`` (chosen, then rejected).
    """
    if not chosen or len(chosen) != len(rejected) or any(len(s) == 0 for s in chosen + rejected):
        raise ValueError("collate_shared needs as many chosen as rejected sequences, at least one, none empty")
    tokens: list[int] = []
    positions: list[int] = []
    segments: list[tuple[int, int, int, int]] = []
    kv_index: list[int] = []
    chosen_last, rejected_last, chosen_index, rejected_index = [], [], [], []
    for c, r in zip(chosen, rejected):
        shared = common_prefix_length(c, r)
        start = len(tokens)
        tokens += c
        positions += range(len(c))
        segments.append((start, start + len(c), start, 0))
        kv_index += range(start, start + len(c))
        chosen_last.append(start + len(c) - 1)
        chosen_index += range(start, start + len(c))
        rejected_index += range(start, start + shared)
        suffix_start = len(tokens)
        if len(r) > shared:
            tokens += r[shared:]
            positions += range(shared, len(r))
            segments.append((suffix_start, len(tokens), start, shared))
            kv_index += [*range(start, start + shared), *range(suffix_start, len(tokens))]
            rejected_index += range(suffix_start, len(tokens))
        rejected_last.append(len(tokens) - 1 if len(r) > shared else start + shared - 1)
    q_lens = [end - start for start, end, _, _ in segments]
    k_lens = [end - start + prefix_len for start, end, _, prefix_len in segments]
    return {
        "input_ids": torch.tensor([tokens]),
        "position_ids": torch.tensor([positions]),
        "prefix_segments": segments,
        "kv_index": torch.tensor(kv_index),
        "cu_seq_lens_q": _cumulative(q_lens),
        "cu_seq_lens_k": _cumulative(k_lens),
        "max_length_q": max(q_lens),
        "max_length_k": max(k_lens),
        "reward_index": torch.tensor(chosen_last + rejected_last),
        "sequence_index": torch.tensor(chosen_index + rejected_index),
        "seq_lens": torch.tensor([len(s) for s in chosen + rejected]),
    }


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)


def unshared(batch: dict) -> dict:
    """The ``collate_packed`` batch of the same sequences (each prefix repeated)."""
    return packed_batch(batch["input_ids"][0, batch["sequence_index"]], batch["seq_lens"])


def shared_rewards(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """Reward of each sequence of a ``collate_shared`` batch -> ``[2n]`` (chosen, then rejected),
    equal to ``packed_rewards`` on the unshared sequences. Models that cannot share (see the
    module docstring) get exactly that, with one warning."""
    reason = _cannot_share(model)
    if reason is not None:
        if not getattr(model, "_rmjob_sharing_announced", False):
            logger.warning("prefix_sharing: %s; computing each pair's prefix twice instead", reason)
            model._rmjob_sharing_announced = True
        return packed_rewards(model, unshared(batch))
    if model.config._attn_implementation != VARLEN_SDPA:
        model._rmjob_flash = _flash_implementation(model, batch["input_ids"].device)
        model.set_attn_implementation(VARLEN_SDPA)
    layout = PrefixLayout(batch["prefix_segments"], batch["kv_index"], batch["cu_seq_lens_q"],
                          batch["cu_seq_lens_k"], batch["max_length_q"], batch["max_length_k"],
                          getattr(model, "_rmjob_flash", None))
    backbone = backbone_of(model)
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      prefix_layout=layout).last_hidden_state
    return model.score(hidden[0, batch["reward_index"]]).squeeze(-1)


def _cannot_share(model: PreTrainedModel) -> str | None:
    if not model._supports_attention_backend:
        return f"{type(model).__name__} does not use transformers' attention interface"
    if model.config.model_type not in PACKED_FAMILIES:
        return f"not verified for {model.config.model_type!r} models (verified: {', '.join(PACKED_FAMILIES)})"
    if model.config._attn_implementation not in SHARING_IMPLEMENTATIONS:
        return (f"attention implementation {model.config._attn_implementation!r} cannot take the shared layout "
                f"(supported: {', '.join(SHARING_IMPLEMENTATIONS)})")
    return None


def _flash_implementation(model: PreTrainedModel, device: torch.device) -> str | None:
    """The flash-attention implementation for the shared layout: the model's own, or for an sdpa
    model flash-attention 2 where installed; None off CUDA or where flash-attention would align
    its causal mask to the first key (then a suffix would not see its prefix)."""
    from transformers.modeling_flash_attention_utils import flash_attn_supports_top_left_mask
    from transformers.utils import is_flash_attn_2_available

    if device.type != "cuda" or flash_attn_supports_top_left_mask():
        return None
    implementation = model.config._attn_implementation
    if implementation.startswith("flash_attention_"):
        return implementation
    return "flash_attention_2" if is_flash_attn_2_available() else None


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            layout: PrefixLayout, sliding_window: int | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of the shared row ``query/key/value`` ``[1, heads, total, head_dim]`` -> output
    ``[1, total, heads, head_dim]``, as transformers' attention functions return it."""
    causal = kwargs.pop("is_causal", None)
    if not (getattr(module, "is_causal", True) if causal is None else causal):
        raise ValueError("prefix_sharing: the layer's attention is not causal, so a prefix would see its suffixes")
    if _use_flash(layout, query):
        return _flash_attention(query, key, value, layout, sliding_window, **kwargs), None
    outputs = []
    for start, end, prefix_start, prefix_len in layout.segments:
        keys, values = key[:, :, start:end], value[:, :, start:end]
        if prefix_len:
            keys = torch.cat([key[:, :, prefix_start:prefix_start + prefix_len], keys], 2)
            values = torch.cat([value[:, :, prefix_start:prefix_start + prefix_len], values], 2)
        mask = None
        if prefix_len or (sliding_window is not None and end - start > 1):
            # queries are the last end - start of the keys; without a window every earlier key is seen
            mask = _window_mask(end - start, keys.shape[2], sliding_window or keys.shape[2], True, query.device)
        output, _ = sdpa_attention_forward(module, query[:, :, start:end], keys, values, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, 1), None


def _use_flash(layout: PrefixLayout, query: torch.Tensor) -> bool:
    return layout.flash is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def _flash_attention(query, key, value, layout: PrefixLayout, sliding_window: int | None, *, dropout: float = 0.0,
                     scaling: float | None = None, softcap: float | None = None, **_) -> torch.Tensor:
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    keys = key.index_select(2, layout.kv_index).transpose(1, 2)
    values = value.index_select(2, layout.kv_index).transpose(1, 2)
    return _flash_attention_forward(
        query.transpose(1, 2), keys, values, None, query_length=query.shape[2], is_causal=True, dropout=dropout,
        softmax_scale=scaling, sliding_window=sliding_window, softcap=softcap,
        cu_seq_lens_q=layout.cu_seq_lens_q, cu_seq_lens_k=layout.cu_seq_lens_k,
        max_length_q=layout.max_length_q, max_length_k=layout.max_length_k, attn_implementation=layout.flash)
