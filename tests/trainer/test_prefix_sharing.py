"""Prefix sharing gives the rewards and gradients of unshared packing (and of padded batches):
edge cases, several pairs per row, sliding windows, gradient checkpointing, LoRA, DDP, the
flash-attention layout, the fallbacks, and whole training runs."""

import json

import pytest
import torch

from rmjob_trainer.model import get_reward
from rmjob_trainer.packing import VARLEN_SDPA, collate_packed, packed_rewards
from rmjob_trainer import prefix_sharing
from rmjob_trainer.prefix_sharing import (SdpaCall, block_mask_is_cheaper, causal_suffix_is_cheaper, collate_shared,
                                          sdpa_calls, shared_prefix_attention, unshared)

from test_packing import FAMILIES, PAD, bt_grads, family_model, padded, tiny_model

ATOL = 1e-5


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = _ids(20, 0)  # longer than test_packing.WINDOW: windowed layers drop part of the prefix
# (chosen, rejected) pairs packed into one row, every edge case among them
PAIRS = {
    "long shared prompt": (PROMPT + _ids(6, 1), PROMPT + _ids(9, 2)),
    "no common prefix": (_ids(7, 3), [96] + _ids(4, 4)),
    "chosen is a prefix of rejected": (PROMPT[:9], PROMPT[:9] + _ids(6, 5)),
    "rejected is a prefix of chosen": (PROMPT + _ids(5, 6), PROMPT[:12]),
    "identical": (PROMPT[:15], PROMPT[:15]),
    "one token, identical": ([7], [7]),
    "differ in the last token only": (PROMPT[:10] + [3], PROMPT[:10] + [4]),
}


def chosen_rejected(names=PAIRS) -> tuple[list[list[int]], list[list[int]]]:
    pairs = [PAIRS[name] for name in names]
    return [c for c, _ in pairs], [r for _, r in pairs]


# (block_mask_is_cheaper, causal_suffix_is_cheaper) that force one layout
FORCED = {"block-mask": (True, False), "per-segment": (False, False), "per-segment-causal": (False, True)}


def force(monkeypatch, layout: str) -> None:
    block_mask, causal_suffix = FORCED[layout]
    monkeypatch.setattr(prefix_sharing, "block_mask_is_cheaper", lambda *_: block_mask)
    monkeypatch.setattr(prefix_sharing, "causal_suffix_is_cheaper", lambda *_: causal_suffix)


@pytest.fixture(params=list(FORCED))
def every_pair(request, monkeypatch) -> str:
    """Every pair of a row in one CPU layout, whichever the rule would pick."""
    force(monkeypatch, request.param)
    return request.param


def test_collate_shared_layout():
    batch = collate_shared([[1, 2, 3, 4], [5], [8, 9]], [[1, 2, 6], [5], [7]])
    # pair 0: prefix [1 2] once, chosen suffix [3 4], rejected suffix [6] at positions 2..;
    # pair 1: identical, no suffix; pair 2: no common prefix
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 6, 5, 8, 9, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 0, 1, 0]]
    assert batch["shared_pairs"] == [(0, 4, 5, 2), (5, 6, 6, 1), (6, 8, 9, 0)]
    # chosen rewards at 3, 5, 7; rejected at 4, 5 (the identical pair: the prefix's last), 8
    assert batch["reward_index"].tolist() == [3, 5, 7, 4, 5, 8]
    assert batch["kv_index"].tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 8]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 5, 6, 8, 9]
    assert batch["cu_seq_lens_k"].tolist() == [0, 4, 7, 8, 10, 11]
    assert batch["cu_seq_lens_q"].dtype == batch["cu_seq_lens_k"].dtype == torch.int32
    assert (batch["max_length_q"], batch["max_length_k"]) == (4, 4)
    (start, end, keys, mask, recomputed), identical, no_prefix = sdpa_calls(batch["shared_pairs"],
                                                                              torch.device("cpu"))
    assert (start, end, keys, recomputed) == (0, 5, None, 0)  # short pairs: one call with a block mask each
    assert mask.int().tolist() == [[1, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 0],
                                   [1, 1, 0, 0, 1]]  # [6] sees the prefix [1 2], not [3 4]
    assert identical == SdpaCall(5, 6, None, None)
    assert no_prefix[:3] == (6, 9, None) and no_prefix.mask.int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    back = unshared(batch)
    want = collate_packed([[1, 2, 3, 4], [5], [8, 9], [1, 2, 6], [5], [7]])
    assert back.keys() == want.keys()
    for key, value in want.items():
        assert (back[key].tolist() if torch.is_tensor(value) else back[key]) == \
               (value.tolist() if torch.is_tensor(value) else value), key
    with pytest.raises(ValueError, match="collate_shared"):
        collate_shared([[1]], [[]])
    with pytest.raises(ValueError, match="collate_shared"):
        collate_shared([[1], [2]], [[1]])


@pytest.mark.parametrize("layout", ["per-segment", "per-segment-causal"])
def test_per_segment_calls(layout, monkeypatch):
    force(monkeypatch, layout)
    batch = collate_shared([[1, 2, 3, 4], [5], [8, 9]], [[1, 2, 6, 7], [5], [7]])
    calls = sdpa_calls(batch["shared_pairs"], torch.device("cpu"))
    # pair 0: [1 2 3 4] causal, then [6 7] against the keys [1 2 6 7]; pair 1: no R; pair 2: no P
    assert [(c.start, c.end, None if c.keys is None else c.keys.tolist()) for c in calls] == \
           [(0, 4, None), (4, 6, [0, 1, 4, 5]), (6, 7, None), (7, 9, None), (9, 10, None)]
    if layout == "per-segment":
        assert calls[1].mask.int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]  # causal, aligned to the last key
        assert calls[1].recomputed == 0
    else:  # the queries [1 2 6 7], causal; the rows of [1 2] dropped
        assert calls[1].mask is None and calls[1].recomputed == 2
    assert all(c.mask is None and c.recomputed == 0 for c in calls if c is not calls[1])


def test_rule_picks_per_segment_for_long_answers_and_the_block_mask_for_short_pairs():
    """The shapes of docs/benchmarks.md ("Prefix sharing on CPU"): a short prompt with long
    answers (the block mask measured 1.7x slower with 1,024-token answers), and the multi-turn
    and single-turn data's median pairs (the block mask measured faster)."""
    assert not block_mask_is_cheaper(32, 1024, 1024)
    assert not block_mask_is_cheaper(32, 256, 256)
    assert block_mask_is_cheaper(357, 41, 42)
    assert block_mask_is_cheaper(66, 56, 64)


def test_rule_picks_per_segment_for_a_long_prefix_with_short_answers():
    """The block mask computes all (p + c + r)**2 scores, the per-segment [P C] call about half of
    its own: with a long prefix that half outweighs R x C (docs/benchmarks.md, per segment up to
    1.5x faster at 2,000/16/16, 1.9x at 4,000/8/8)."""
    assert not block_mask_is_cheaper(2000, 16, 16)
    assert not block_mask_is_cheaper(1000, 32, 32)
    assert not block_mask_is_cheaper(4000, 8, 8)


def test_a_windowed_layer_runs_only_the_rejected_suffix_queries(monkeypatch):
    """On a windowed layer every SDPA call carries a mask, so a causal suffix would compute all
    (p + r)**2 scores, P's rows for nothing: R's queries go alone there. Gemma 3 mixes windowed
    and global layers: the global ones keep the causal suffix."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def spy(module, query, key, value, mask, **kwargs):
        calls.append((module.sliding_window, query.shape[2], key.shape[2], mask is None))
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(prefix_sharing, "sdpa_attention_forward", spy)
    monkeypatch.setattr(prefix_sharing, "block_mask_is_cheaper", lambda *_: False)  # short, for a tiny model
    model = family_model("gemma3_text")
    chosen, rejected = [PROMPT[:4] + _ids(12, 12)], [PROMPT[:4] + _ids(10, 13)]  # p < r: a causal suffix
    batch = collate_shared(chosen, rejected)
    assert [c.recomputed for c in sdpa_calls(batch["shared_pairs"], torch.device("cpu"))] == [0, 4]
    with torch.no_grad():
        shared = packed_rewards(model, batch)
        unshared_rewards = packed_rewards(model, collate_packed(chosen + rejected))
    torch.testing.assert_close(shared, unshared_rewards, rtol=0, atol=ATOL)
    windowed = [(queries, keys, unmasked) for window, queries, keys, unmasked in calls if window]
    full = [(queries, keys, unmasked) for window, queries, keys, unmasked in calls if not window]
    assert windowed == [(16, 16, False), (10, 14, False)] * 2  # two windowed layers
    assert full == [(16, 16, True), (14, 14, True)]


def test_a_window_longer_than_every_sequence_masks_nothing(monkeypatch):
    """Mistral's 4,096-token window over shorter sequences hides nothing: its layers take the
    unmasked (is_causal) calls the rule's costs assume, as transformers drops such a mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    masks = []

    def spy(module, query, key, value, mask, **kwargs):
        masks.append(mask)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(prefix_sharing, "sdpa_attention_forward", spy)
    monkeypatch.setattr(prefix_sharing, "block_mask_is_cheaper", lambda *_: False)
    model = family_model("mistral")
    model.config.sliding_window = 64  # read by every layer; the sequences here are at most 29 long
    chosen, rejected = [PROMPT[:4] + _ids(12, 12)], [PROMPT[:4] + _ids(10, 13)]
    with torch.no_grad():
        shared = packed_rewards(model, collate_shared(chosen, rejected))
        unshared_rewards = packed_rewards(model, collate_packed(chosen + rejected))
    torch.testing.assert_close(shared, unshared_rewards, rtol=0, atol=ATOL)
    assert masks and all(mask is None for mask in masks)


def test_long_answers_after_a_short_prompt_get_the_attention_of_unshared_packing():
    """R's masked call against [P R] computes every score, where unshared packing's causal call
    skips those above the diagonal: with 1,024-token answers after a 32-token prompt it made
    sharing 12-17% slower than not sharing (docs/benchmarks.md). Such a pair's R is one causal
    call over [P R], P's rows dropped; a long prefix with a shorter suffix keeps the masked call."""
    assert causal_suffix_is_cheaper(32, 1024)
    assert not causal_suffix_is_cheaper(2000, 40)
    batch = collate_shared([list(range(1, 33)) + [1] * 1024], [list(range(1, 33)) + [2] * 1024])
    chosen, rejected = sdpa_calls(batch["shared_pairs"], torch.device("cpu"))
    assert chosen == SdpaCall(0, 1056, None, None)
    assert (rejected.start, rejected.end, rejected.mask, rejected.recomputed) == (1056, 2080, None, 32)
    assert rejected.keys.tolist() == [*range(32), *range(1056, 2080)]


def test_the_rule_mixes_layouts_in_one_row_with_unshared_rewards_and_gradients():
    chosen, rejected = chosen_rejected()
    chosen.append(PROMPT[:8] + _ids(300, 7))  # long answers after a short prompt: a causal suffix
    rejected.append(PROMPT[:8] + _ids(280, 8))
    long_prompt = _ids(200, 9)  # a long prompt, shorter answers: R's masked call
    chosen.append(long_prompt + _ids(200, 10))
    rejected.append(long_prompt + _ids(130, 11))
    batch = collate_shared(chosen, rejected)
    calls = sdpa_calls(batch["shared_pairs"], torch.device("cpu"))
    causal_suffix, masked_suffix = [c for c in calls if c.keys is not None]
    assert causal_suffix.start == batch["shared_pairs"][-2][1] and causal_suffix.recomputed == 8
    assert causal_suffix.mask is None
    assert masked_suffix.start == batch["shared_pairs"][-1][1] and masked_suffix.recomputed == 0
    assert masked_suffix.mask is not None
    assert sum(c.mask is not None and c.keys is None for c in calls) == 4  # the short pairs with R: block masks
    for family in ("llama", "mistral"):  # grouped-query heads; a window reaching into the prefix
        model = family_model(family)
        unshared_rewards = packed_rewards(model, collate_packed(chosen + rejected))
        expected = bt_grads(model, unshared_rewards)
        shared = packed_rewards(model, batch)
        got = bt_grads(model, shared)
        torch.testing.assert_close(shared, unshared_rewards, rtol=0, atol=ATOL)
        assert got.keys() == expected.keys() and len(got) > 0
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=ATOL, msg=f"{family} {name}")


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_shared_rewards_and_gradients_equal_unshared_and_padded(arch, every_pair):
    """All edge cases in one row; the reference is the unshared packed row and padded batches."""
    model = tiny_model(arch, "sdpa")
    chosen, rejected = chosen_rejected()
    sequences = chosen + rejected

    reference = get_reward(model, padded(sequences), PAD)
    padded_grads = bt_grads(model, reference)
    packed = packed_rewards(model, collate_packed(sequences))
    packed_grads = bt_grads(model, packed)

    batch = collate_shared(chosen, rejected)
    assert batch["input_ids"].shape[1] < sum(map(len, sequences))  # something is shared
    calls = sdpa_calls(batch["shared_pairs"], torch.device("cpu"))
    assert len(calls) == (len(PAIRS) if every_pair == "block-mask" else len(PAIRS) + 4)  # 4 pairs have an R
    shared = packed_rewards(model, batch)
    shared_grads = bt_grads(model, shared)

    assert model.config._attn_implementation == VARLEN_SDPA
    torch.testing.assert_close(shared, packed, rtol=0, atol=ATOL)
    torch.testing.assert_close(shared, reference, rtol=0, atol=ATOL)
    assert shared_grads.keys() == packed_grads.keys() == padded_grads.keys() and len(shared_grads) > 0
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, packed_grads[name], rtol=1e-4, atol=ATOL, msg=name)
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=ATOL, msg=name)


@pytest.mark.parametrize("name", list(PAIRS))
def test_each_edge_case_alone_equals_its_sequences_alone(name, every_pair):
    model = tiny_model("llama", "sdpa")
    (chosen,), (rejected,) = chosen_rejected([name])
    with torch.no_grad():
        alone = torch.cat([get_reward(model, torch.tensor([s]), PAD) for s in (chosen, rejected)])
        shared = packed_rewards(model, collate_shared([chosen], [rejected]))
    torch.testing.assert_close(shared, alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_packed_family_with_sliding_windows(family, every_pair):
    """The rejected suffix's window reaches back into the shared prefix as far as in its own
    sequence, no further."""
    model = family_model(family)
    chosen, rejected = chosen_rejected()
    with torch.no_grad():
        alone = torch.cat([get_reward(model, torch.tensor([s]), PAD) for s in chosen + rejected])
        shared = packed_rewards(model, collate_shared(chosen, rejected))
    torch.testing.assert_close(shared, alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_gradients_with_sliding_windows(family, every_pair):
    model = family_model(family)
    chosen, rejected = chosen_rejected()
    expected = bt_grads(model, packed_rewards(model, collate_packed(chosen + rejected)))
    got = bt_grads(model, packed_rewards(model, collate_shared(chosen, rejected)))
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=ATOL, msg=name)


def test_gradients_with_gradient_checkpointing(every_pair):
    """Recomputed layers get the layout again (it travels as a keyword argument)."""
    model = tiny_model("gpt_neox", "sdpa")
    chosen, rejected = chosen_rejected()
    expected = bt_grads(model, packed_rewards(model, collate_packed(chosen + rejected)))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got = bt_grads(model, packed_rewards(model, collate_shared(chosen, rejected)))
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=ATOL, msg=name)


def test_lora_gradients_equal_unshared(tiny_model_dir):
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.model import add_lora

    model = tiny_model("llama", "sdpa")
    model = add_lora(model, RewardConfig(use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():  # B starts at 0: make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    chosen, rejected = chosen_rejected()
    unshared_rewards = packed_rewards(model, collate_packed(chosen + rejected))
    expected = bt_grads(model, unshared_rewards)
    shared = packed_rewards(model, collate_shared(chosen, rejected))
    got = bt_grads(model, shared)
    torch.testing.assert_close(shared, unshared_rewards, rtol=0, atol=ATOL)
    assert got.keys() == expected.keys() and any("lora_A" in name for name in got)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=ATOL, msg=name)


def _varlen_reference(query, key, value, attention_mask, query_length, is_causal, dropout=0.0,
                      softmax_scale=None, sliding_window=None, softcap=None, cu_seq_lens_q=None,
                      cu_seq_lens_k=None, max_length_q=None, max_length_k=None, attn_implementation=None, **kwargs):
    """flash_attn_varlen_func's semantics ([1, tokens, heads, dim], causal aligned to the last key,
    window (w-1, w-1)) for the call transformers' _flash_attention_forward makes, on CPU."""
    assert attention_mask is None and is_causal and attn_implementation == "flash_attention_2" and not kwargs
    assert query.shape[1] == query_length == cu_seq_lens_q[-1] and key.shape[1] == cu_seq_lens_k[-1]
    q_lens, k_lens = cu_seq_lens_q.diff().tolist(), cu_seq_lens_k.diff().tolist()
    assert (max(q_lens), max(k_lens)) == (max_length_q, max_length_k)
    outputs = []
    for q, k, v in zip(query[0].split(q_lens), key[0].split(k_lens), value[0].split(k_lens)):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
        distance = torch.arange(len(k) - len(q), len(k))[:, None] - torch.arange(len(k))[None]
        allowed = (distance >= 0) & (distance < (sliding_window or len(k)))
        outputs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v))
    return torch.cat(outputs).unsqueeze(0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_flash_varlen_layout_equals_per_segment_sdpa(family, monkeypatch):
    """The GPU path's gathered keys and cu_seq_lens, run through a CPU stand-in for the varlen
    kernel, give the per-segment SDPA rewards (grouped-query heads; Mistral: a window)."""
    import transformers.modeling_flash_attention_utils as flash_utils

    from rmjob_trainer import prefix_sharing

    model = family_model(family)
    chosen, rejected = chosen_rejected()
    batch = collate_shared(chosen, rejected)
    with torch.no_grad():
        per_segment = packed_rewards(model, batch)
        monkeypatch.setattr(prefix_sharing, "_flash_implementation", lambda model, device: "flash_attention_2")
        monkeypatch.setattr(prefix_sharing, "_use_flash", lambda layout, query: layout.flash is not None)
        monkeypatch.setattr(flash_utils, "_flash_attention_forward", _varlen_reference)
        model.set_attn_implementation("sdpa")  # switched again, now choosing flash
        flash = packed_rewards(model, batch)
    assert model._rmjob_flash == "flash_attention_2"
    torch.testing.assert_close(flash, per_segment, rtol=0, atol=ATOL)


def test_non_causal_attention_is_refused():
    class Bidirectional(torch.nn.Module):
        is_causal = False

    batch = collate_shared([[1, 2]], [[1, 3]])
    layout = _layout(batch)
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="not causal"):
        shared_prefix_attention(Bidirectional(), q, q, q, layout)


def _layout(batch):
    from rmjob_trainer.prefix_sharing import PrefixLayout

    return PrefixLayout(batch["shared_pairs"], sdpa_calls(batch["shared_pairs"], torch.device("cpu")),
                        batch["position_ids"][0], batch["kv_index"], batch["cu_seq_lens_q"],
                        batch["cu_seq_lens_k"], batch["max_length_q"], batch["max_length_k"], None, [])


def test_a_model_that_drops_the_layout_is_refused(monkeypatch):
    """Should a transformers version stop passing unknown keyword arguments to the attention
    layers, the rejected suffixes would silently lose their prefix: refused instead."""
    from rmjob_trainer import packing

    model = tiny_model("llama", "sdpa")
    forward = packing.sdpa_varlen_attention

    def dropping_layer_1(module, *args, **kwargs):
        if module.layer_idx == 1:
            kwargs.pop("prefix_layout")
        return forward(module, *args, **kwargs)

    monkeypatch.setattr(packing, "sdpa_varlen_attention", dropping_layer_1)
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_SDPA, dropping_layer_1)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="1 of 2 attention layers"):
            packed_rewards(model, collate_shared(*chosen_rejected()))
    finally:
        AttentionInterface.register(VARLEN_SDPA, forward)


def test_eager_models_fall_back_to_unshared_packing_with_one_warning(caplog):
    model = tiny_model("llama", "eager")
    chosen, rejected = chosen_rejected()
    with torch.no_grad(), caplog.at_level("WARNING", logger="rmjob_trainer.prefix_sharing"):
        want = packed_rewards(model, collate_packed(chosen + rejected))
        got = packed_rewards(model, collate_shared(chosen, rejected))
        packed_rewards(model, collate_shared(chosen, rejected))
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert model.config._attn_implementation == "eager"
    warnings = [r.getMessage() for r in caplog.records if r.name == "rmjob_trainer.prefix_sharing"]
    assert len(warnings) == 1 and "'eager'" in warnings[0] and "twice" in warnings[0]


def test_unverified_families_get_padded_batches_and_no_interface_is_refused():
    from transformers import AutoModelForSequenceClassification, Olmo2Config

    config = Olmo2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, num_labels=1, pad_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    chosen, rejected = chosen_rejected()
    with torch.no_grad():
        alone = torch.cat([get_reward(model, torch.tensor([s]), PAD) for s in chosen + rejected])
        got = packed_rewards(model, collate_shared(chosen, rejected))
    torch.testing.assert_close(got, alone, rtol=0, atol=ATOL)
    assert model.config._attn_implementation == "sdpa"

    model = tiny_model("gpt_neox", "sdpa")
    model._supports_attention_backend = False  # as for remote code with its own attention
    with pytest.raises(ValueError, match="padding_free"):
        packed_rewards(model, collate_shared(chosen, rejected))


# --- whole runs -----------------------------------------------------------------------------
def _train(tiny_model_dir, bundled_dataset_dir, output_dir, **overrides) -> dict:
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.train import train

    return train(RewardConfig(**{**dict(
        dataset_mixer={str(bundled_dataset_dir): 1.0}, model_name_or_path=str(tiny_model_dir),
        sanity_check=True, sanity_check_max_samples=200, per_device_train_batch_size=8,
        per_device_eval_batch_size=50, learning_rate=2e-3, num_train_epochs=2, num_evals=2,
        padding_free=True, output_dir=str(output_dir), run_name="prefix-sharing"), **overrides}))


def test_training_with_prefix_sharing_matches_unshared(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """The whole loop (steps with accumulation, then eval) gives the unshared metrics."""
    def run(prefix_sharing: bool) -> dict:
        return _train(tiny_model_dir, bundled_dataset_dir, tmp_path / str(prefix_sharing), sanity_check_max_samples=32,
                      per_device_train_batch_size=4, gradient_accumulation_steps=2, per_device_eval_batch_size=16,
                      num_train_epochs=1, num_evals=1, prefix_sharing=prefix_sharing)

    shared, plain = run(True), run(False)
    keys = [k for k in plain if k.startswith(("train/rm/", "eval/rm/"))]
    assert "eval/rm/loss" in keys and "train/rm/loss" in keys
    assert {k: shared[k] for k in keys} == pytest.approx({k: plain[k] for k in keys}, rel=1e-4, abs=1e-5)


def test_training_with_prefix_sharing_learns_the_bundled_data(tiny_model_dir, bundled_dataset_dir, tmp_path):
    metrics = _train(tiny_model_dir, bundled_dataset_dir, tmp_path, prefix_sharing=True)
    assert metrics["eval/rm/accuracy"] >= 0.9
    assert metrics["eval/rm/loss"] < 0.4


def test_bundled_pairs_do_share_a_prefix(tiny_model_dir, bundled_dataset_dir):
    """Without a shared prefix the run above would prove nothing."""
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.data import build_datasets
    from rmjob_trainer.model import load_tokenizer
    from rmjob_trainer.prefix_sharing import common_prefix_length
    from rmjob_trainer.train import CHOSEN, REJECTED

    cfg = RewardConfig(dataset_mixer={str(bundled_dataset_dir): 1.0}, model_name_or_path=str(tiny_model_dir),
                       sanity_check=True, sanity_check_max_samples=50)
    train_set, _ = build_datasets(cfg, load_tokenizer(cfg))
    shared = [common_prefix_length(c, r) for c, r in zip(train_set[CHOSEN], train_set[REJECTED])]
    assert min(shared) >= 3 and sum(shared) / len(shared) > 5


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")
def test_ddp_with_prefix_sharing_matches_ddp_without(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """Two processes (DDP, gloo) with and without prefix sharing: the same losses at every step
    and the same eval metrics. The final rewards are compared to 1e-4: after 10 Adam steps the
    float rounding of the two attention layouts (1e-7 in a step's gradients) has grown to 4e-5
    in the mean chosen reward (0.37), while the losses of every step still agree to 1e-4."""
    from test_distributed import _flags, _losses, _run

    for sharing in ("true", "false"):
        _run(_flags(tiny_model_dir, bundled_dataset_dir, tmp_path / sharing, grad_accum=1)
             + ["--prefix_sharing", sharing], processes=2)
    assert _losses(tmp_path / "true") == pytest.approx(_losses(tmp_path / "false"), rel=1e-4, abs=1e-5)
    got, want = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("true", "false"))
    for key in ("eval/rm/accuracy", "eval/rm/loss", "eval/rm/chosen_rewards", "eval/rm/rejected_rewards"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key
