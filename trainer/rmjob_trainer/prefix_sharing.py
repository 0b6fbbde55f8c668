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
(the rejected sequence is a prefix of the chosen one, or equal to it). Dropout in training mode
(only ``lora_dropout``: model.py turns every other dropout off) draws one mask for ``P``, used by
both sequences where unshared each copy draws its own: the two rewards' noise is correlated, so
the expected loss differs from unshared training (docs/training.md, "Prefix sharing").

The layout reaches every attention layer as the ``prefix_layout`` keyword argument (so
recomputation under gradient checkpointing sees it too) of the ``sdpa_varlen`` attention
(packing.py), which hands it to :func:`shared_prefix_attention`:

* SDPA (CPU, and the GPU fallback), per pair one of three layouts, chosen by
  :func:`block_mask_is_cheaper` and :func:`causal_suffix_is_cheaper` from the pair's token
  counts (``p`` shared, ``c`` and ``r`` in the chosen and the rejected suffix):

  - one call over ``[P C R]`` with a block mask: causal, except that ``R`` does not see ``C``
    (and a windowed layer's window, by position). SDPA with a mask computes every score,
    masked or not: ``(p + c + r)**2``.
  - per segment: ``[P C]`` with ``is_causal``, then ``R`` against the keys ``[P R]`` (gathered)
    with a causal mask aligned to the last key: about ``(p + c)**2 / 2 + r * (p + r)`` scores
    (SDPA's CPU kernel skips blocks of keys above the diagonal of a causal call), at the price of
    a second call and a copy of ``P``'s and ``R``'s keys and values.
  - per segment with a causal suffix: ``[P C]`` as above, then the queries ``[P R]`` against
    the keys ``[P R]`` (both gathered) with ``is_causal``, ``P``'s rows of the output dropped:
    the attention unshared packing computes for the rejected sequence, ``P``'s rows included,
    while ``P``'s other work (embeddings, projections, MLPs) stays shared; about
    ``(p + r)**2 / 2`` scores for ``R``'s call.

  Both layouts compute ``P``'s other work once, so the work sharing saves does not enter the
  choice; the scores do. The block mask computes ``(p + c + r)**2``; per segment about
  ``(p + c)**2 / 2 + min(r * (p + r), (p + r)**2 / 2)`` (its cheaper suffix). Counting only the block
  mask's masked scores, ``r * (p + 2c)`` (9df80ee), ignores that the per-segment ``[P C]`` call
  skips half of its own: with a long prefix and short answers that half dominates (2,000 / 16 / 16
  tokens: per segment 1.5x faster; docs/benchmarks.md). The block mask is kept while its extra
  scores stay at most ``BLOCK_MASK_MAX_EXTRA_SCORES``, what a second call and the gathered keys
  cost. Measured with bench/prefix_attention.py (the benchmark's small GPT-NeoX, 1 thread, CPU
  time per training step; docs/benchmarks.md, "Prefix sharing on CPU"), the block mask was ahead
  up to ~97k extra scores (the multi-turn data's median pair, 357 / 41 / 41.5 tokens: 10%; a
  350-token prefix with 40-token answers: 1.5%; single-turn's median: 19k), the two were within 1%
  at 123k (192-token answers after a 32-token prompt) and 141k (450 / 40 / 40), and per segment
  was ahead past that: 8% at 169k (500 / 40 / 40), 6% at 213k (256-token answers after a 32-token
  prompt), 10% at 232k (600 / 40 / 40), 1.27x at 584k (1,000 / 40 / 40), 1.46x at 2.2M (2,000 /
  40 / 40). The threshold, 131,072, lies between the two points of equality, which the two ways of
  growing a pair (longer answers, a longer prefix) put at about the same count. The crossover is
  that of a small model on CPU; near it the choice costs a few percent either way. Past it,
  ``R``'s masked call computes all ``r * (p + r)`` scores, where a causal call over ``[P R]``
  computes about ``(p + r)**2 / 2`` and recomputes ``P``'s ``p`` rows: the causal suffix is
  cheaper while ``p < r``. With ``R``'s masked call, 1,024-token answers after a 32-token prompt
  took 12-17% more time than unshared packing (the prefix saves little); with the causal suffix no
  pair's attention costs more than unshared packing's, and ``P``'s other work is still done once
  (docs/benchmarks.md). On a windowed layer every call carries a mask (the window), so SDPA
  computes every score of every call: there the causal suffix would compute all ``(p + r)**2``,
  and :func:`shared_prefix_attention` runs ``R``'s queries alone, masked, as in the masked suffix
  (the choice of layouts is per forward pass, for all layers). The masks and gathered key indices
  are built once per forward pass, on the batch's device, for all layers.
* flash-attention varlen (CUDA, fp16/bf16, flash-attn >= 2.1 installed): keys and values
  gathered into ``[P C] [P R]`` per pair (a copy of ``P``'s keys, not a recomputation) and one
  varlen call with ``causal=True``, which flash-attention aligns to the last key when a
  segment has more keys than queries. No masked scores are computed.

Correct only where the sequence a token belongs to is given by attention alone and its position
by ``position_ids`` alone: the rotary families of ``packing.PACKED_FAMILIES`` (learned absolute
positions such as GPT-2's would also follow ``position_ids``, but are not verified, so such
models get padded batches as for packing). Models outside those families and attention
implementations other than sdpa and flash-attention (eager, flex) get the same pairs unshared,
through :func:`packed_rewards` (which refuses models without transformers' attention
interface), with one warning. A forward pass in which not every layer received the layout (a
transformers version that stopped passing keyword arguments through) is an error, not R
computed without its prefix.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rmjob_trainer.model import backbone_of
from rmjob_trainer.packing import PACKED_FAMILIES, VARLEN_SDPA, packed_batch, packed_rewards

logger = logging.getLogger(__name__)

SHARING_IMPLEMENTATIONS = ("sdpa", VARLEN_SDPA, "flash_attention_2", "flash_attention_3")
# where a pair's block mask stops paying off: the scores it computes beyond the per-segment calls'
# (module docstring, measured)
BLOCK_MASK_MAX_EXTRA_SCORES = 131_072


class SdpaCall(NamedTuple):
    """One SDPA call over the shared row: the queries ``row[start:end]`` against the keys and
    values ``row[keys]`` (None: the queries' own tokens), ``mask`` ``[queries, keys]`` (None:
    causal). ``recomputed`` > 0: the queries are ``row[keys]`` as well, so that the call can be
    causal, and the output's first ``recomputed`` rows (``P``'s, computed again) are dropped."""

    start: int
    end: int
    keys: torch.Tensor | None
    mask: torch.Tensor | None
    recomputed: int = 0


class PrefixLayout(NamedTuple):
    """Where each pair lies in the row, and how each attention kernel sees it (see the module
    docstring).

    ``pairs``: per pair ``(start, chosen_end, end, shared)``: ``[P C]`` is
    ``row[start:chosen_end]``, ``R`` is ``row[chosen_end:end]``, ``P`` its first ``shared``
    tokens. ``sdpa``: the SDPA calls covering the row in order (:func:`sdpa_calls`),
    ``positions``: the row's position ids ``[total]`` (windows are by position).
    ``kv_index``, ``cu_seq_lens_q/k``, ``max_length_q/k``: the segments ``[P C]``, ``R`` as a
    flash-attention varlen call sees them (keys gathered by ``kv_index``). ``flash``: the
    flash-attention implementation to use on CUDA, or None. ``calls``: one entry per attention
    call that used the layout (checked after the forward pass).
    """

    pairs: list[tuple[int, int, int, int]]
    sdpa: list[SdpaCall]
    positions: torch.Tensor
    kv_index: torch.Tensor
    cu_seq_lens_q: torch.Tensor
    cu_seq_lens_k: torch.Tensor
    max_length_q: int
    max_length_k: int
    flash: str | None
    calls: list[str]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def collate_shared(chosen: list[list[int]], rejected: list[list[int]]) -> dict:
    """Pairs packed into one row, each common prefix once.

    Returns ``input_ids`` and ``position_ids`` ``[1, total]``, ``shared_pairs`` (the
    ``PrefixLayout.pairs``), the varlen segments (``kv_index``, ``cu_seq_lens_q``,
    ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``), ``reward_index`` ``[2n]`` (where each
    chosen, then each rejected reward is read) and, to rebuild the unshared sequences,
    ``sequence_index`` and ``seq_lens`` (chosen, then rejected).
    """
    if not chosen or len(chosen) != len(rejected) or any(len(s) == 0 for s in chosen + rejected):
        raise ValueError("collate_shared needs as many chosen as rejected sequences, at least one, none empty")
    tokens: list[int] = []
    positions: list[int] = []
    pairs: list[tuple[int, int, int, int]] = []
    kv_index: list[int] = []
    q_lens: list[int] = []
    k_lens: list[int] = []
    chosen_last, rejected_last, chosen_index, rejected_index = [], [], [], []
    for c, r in zip(chosen, rejected):
        shared = common_prefix_length(c, r)
        start = len(tokens)
        tokens += c + r[shared:]
        positions += [*range(len(c)), *range(shared, len(r))]
        chosen_end, end = start + len(c), len(tokens)
        pairs.append((start, chosen_end, end, shared))
        chosen_index += range(start, chosen_end)
        rejected_index += [*range(start, start + shared), *range(chosen_end, end)]
        chosen_last.append(chosen_end - 1)
        rejected_last.append(end - 1 if end > chosen_end else start + shared - 1)
        kv_index += range(start, chosen_end)
        q_lens.append(len(c))
        k_lens.append(len(c))
        if end > chosen_end:
            kv_index += [*range(start, start + shared), *range(chosen_end, end)]
            q_lens.append(end - chosen_end)
            k_lens.append(len(r))
    return {
        "input_ids": torch.tensor([tokens]),
        "position_ids": torch.tensor([positions]),
        "shared_pairs": pairs,
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
    layout = PrefixLayout(batch["shared_pairs"], sdpa_calls(batch["shared_pairs"], batch["input_ids"].device),
                          batch["position_ids"][0], batch["kv_index"], batch["cu_seq_lens_q"],
                          batch["cu_seq_lens_k"], batch["max_length_q"], batch["max_length_k"],
                          getattr(model, "_rmjob_flash", None), [])
    backbone = backbone_of(model)
    hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                      prefix_layout=layout).last_hidden_state
    if len(layout.calls) != model.config.num_hidden_layers:
        # A layer that did not get the layout attended by position_ids alone: R without its prefix.
        raise RuntimeError(f"prefix_sharing: {len(layout.calls)} of {model.config.num_hidden_layers} attention "
                           f"layers of {type(model).__name__} received the shared layout (this transformers "
                           "version does not pass it through); set prefix_sharing to false")
    return model.score(hidden[0, batch["reward_index"]]).squeeze(-1)


def block_mask_is_cheaper(shared: int, chosen_suffix: int, rejected_suffix: int) -> bool:
    """Whether one SDPA call with a block mask beats two per segment for a pair with a prefix of
    ``shared`` tokens and suffixes of ``chosen_suffix`` and ``rejected_suffix`` tokens (see the
    module docstring): yes while the scores it computes beyond those of the per-segment calls
    stay under what a second call and the gathered keys cost."""
    chosen, rejected = shared + chosen_suffix, shared + rejected_suffix
    block_mask = (chosen + rejected_suffix) ** 2
    per_segment = chosen ** 2 / 2 + min(rejected_suffix * rejected, rejected ** 2 / 2)
    return block_mask - per_segment <= BLOCK_MASK_MAX_EXTRA_SCORES


def causal_suffix_is_cheaper(shared: int, rejected_suffix: int) -> bool:
    """Whether ``R``'s call over the queries ``[P R]`` with ``is_causal`` (about
    ``(p + r)**2 / 2`` scores, ``P``'s rows computed again) beats its masked call against the keys
    ``[P R]`` (all ``r * (p + r)`` scores): yes while the prefix is shorter than the suffix."""
    return shared < rejected_suffix


def sdpa_calls(pairs: list[tuple[int, int, int, int]], device: torch.device) -> list[SdpaCall]:
    """The SDPA calls of a shared row, each pair's by :func:`block_mask_is_cheaper`: one over
    ``[P C R]`` whose mask hides ``C`` from ``R``, or ``[P C]`` (causal), then by
    :func:`causal_suffix_is_cheaper` ``R`` against the keys ``[P R]`` (causal, aligned to the
    last key) or the queries ``[P R]`` against them (causal, ``P``'s rows dropped). A pair
    without ``R`` is one causal call."""
    calls: list[SdpaCall] = []
    for start, chosen_end, end, shared in pairs:
        chosen_suffix, rejected_suffix = chosen_end - start - shared, end - chosen_end
        if rejected_suffix == 0:
            calls.append(SdpaCall(start, end, None, None))
        elif block_mask_is_cheaper(shared, chosen_suffix, rejected_suffix):
            index = torch.arange(end - start, device=device)
            mask = index[:, None] >= index[None, :]
            mask[chosen_end - start:, shared:chosen_end - start] = False
            calls.append(SdpaCall(start, end, None, mask))
        elif shared == 0:
            calls += [SdpaCall(start, chosen_end, None, None), SdpaCall(chosen_end, end, None, None)]
        else:
            keys = torch.cat([torch.arange(start, start + shared, device=device),
                              torch.arange(chosen_end, end, device=device)])
            calls.append(SdpaCall(start, chosen_end, None, None))
            if causal_suffix_is_cheaper(shared, rejected_suffix):
                calls.append(SdpaCall(chosen_end, end, keys, None, shared))
            else:
                queries = torch.arange(shared, shared + rejected_suffix, device=device)
                mask = queries[:, None] >= torch.arange(shared + rejected_suffix, device=device)[None, :]
                calls.append(SdpaCall(chosen_end, end, keys, mask))
    return calls


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
    layout.calls.append("flash" if _use_flash(layout, query) else "sdpa")
    if _use_flash(layout, query):
        return _flash_attention(query, key, value, layout, sliding_window, **kwargs), None
    if sliding_window is not None and layout.max_length_k <= sliding_window:
        sliding_window = None  # no sequence is longer than the window: it hides nothing (as in transformers)
    outputs = []
    for start, end, keys, mask, recomputed in layout.sdpa:
        key_rows = slice(start, end) if keys is None else keys
        if sliding_window is not None:
            # A windowed call carries a mask, and SDPA with a mask computes every score: the causal
            # suffix's P rows would be all cost, so R's queries go alone. Positions increase along
            # each call's keys, so "causal" is a key at a position not after the query's.
            recomputed = 0
            distance = layout.positions[start:end, None] - layout.positions[key_rows][None, :]
            mask = (distance < sliding_window) & ((distance >= 0) if mask is None else mask)
        if keys is None:
            call_keys, call_values = key[:, :, start:end], value[:, :, start:end]
        else:
            call_keys, call_values = key.index_select(2, keys), value.index_select(2, keys)
        call_queries = query.index_select(2, keys) if recomputed else query[:, :, start:end]
        output, _ = sdpa_attention_forward(module, call_queries, call_keys, call_values,
                                           None if mask is None else mask[None, None], **kwargs)
        outputs.append(output[:, recomputed:])
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
