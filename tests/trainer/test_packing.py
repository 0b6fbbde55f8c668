"""Padding-free rewards equal padded rewards, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, GPTNeoXConfig, LlamaConfig

from rmjob_trainer.model import get_reward
from rmjob_trainer.packing import VARLEN_SDPA, collate_packed, packed_rewards

PAD = 0
# chosen then rejected, uneven lengths, including a 1-token sequence
LENGTHS = [7, 23, 1, 12, 30, 5]


def tiny_model(arch: str, attn: str):
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, num_labels=1, pad_token_id=PAD)
    if arch == "gpt_neox":
        config = GPTNeoXConfig(rotary_pct=0.25, **common)
    else:  # grouped-query attention exercises repeat_kv in the varlen path
        config = LlamaConfig(num_key_value_heads=2, **common)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn, dtype=torch.float32)


def sequences() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, 97, (n,), generator=generator).tolist() for n in LENGTHS]


def padded(seqs: list[list[int]]) -> torch.Tensor:
    longest = max(map(len, seqs))
    return torch.tensor([s + [PAD] * (longest - len(s)) for s in seqs])


def bt_grads(model, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients of the Bradley-Terry loss of ``rewards`` (the chosen half, then the rejected
    one), by parameter name; the model's own are cleared for the next comparison."""
    chosen, rejected = rewards.chunk(2)
    (-F.logsigmoid(chosen - rejected).mean()).backward()
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_collate_packed_layout():
    batch = collate_packed([[5, 6, 7], [8], [9, 10]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["seq_lens"].tolist() == [3, 1, 2]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 4, 6]
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 3
    with pytest.raises(ValueError):
        collate_packed([[1], []])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_packed_rewards_and_gradients_equal_padded(arch, attn):
    model = tiny_model(arch, attn)
    seqs = sequences()

    padded_rewards = get_reward(model, padded(seqs), PAD)
    padded_grads = bt_grads(model, padded_rewards)

    packed = packed_rewards(model, collate_packed(seqs))
    packed_grads = bt_grads(model, packed)

    # sdpa models run on the per-sequence kernel; others keep their own implementation
    assert model.config._attn_implementation == (VARLEN_SDPA if attn == "sdpa" else attn)
    torch.testing.assert_close(packed, padded_rewards, rtol=0, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(packed_grads) > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_varlen_model_still_right_for_padded_and_unannotated_packed_input(arch):
    """After the switch to sdpa_varlen, padded batches (get_reward, eval) are unchanged, and a
    packed row passed without cu_seq_lens is split by its position_ids, never attended across."""
    model = tiny_model(arch, "sdpa")
    seqs = sequences()
    with torch.no_grad():
        before = get_reward(model, padded(seqs), PAD)
        packed_rewards(model, collate_packed(seqs))
        assert model.config._attn_implementation == VARLEN_SDPA
        after = get_reward(model, padded(seqs), PAD)

        batch = collate_packed(seqs)
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        unannotated = model.score(hidden[0, batch["cu_seq_lens"][1:].long() - 1]).squeeze(-1)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(unannotated, before, rtol=0, atol=1e-5)


def test_packed_gradients_with_gradient_checkpointing():
    """Recomputed layers must see the same per-sequence attention as the first forward."""
    model = tiny_model("gpt_neox", "sdpa")
    seqs = sequences()
    expected = bt_grads(model, get_reward(model, padded(seqs), PAD))

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got = bt_grads(model, packed_rewards(model, collate_packed(seqs)))
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_model_without_attention_interface_is_refused():
    model = tiny_model("gpt_neox", "sdpa")
    model._supports_attention_backend = False  # as for remote code with its own attention
    with pytest.raises(ValueError, match="padding_free"):
        packed_rewards(model, collate_packed(sequences()))


def test_training_padding_free_matches_padded(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """The whole loop (train steps with accumulation, then eval) gives the same metrics."""
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.train import train

    def run(padding_free: bool) -> dict:
        return train(RewardConfig(
            dataset_mixer={str(bundled_dataset_dir): 1.0}, model_name_or_path=str(tiny_model_dir),
            sanity_check=True, sanity_check_max_samples=32, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, per_device_eval_batch_size=16, learning_rate=2e-3,
            padding_free=padding_free, output_dir=str(tmp_path / str(padding_free)), run_name="packing",
        ))

    padded_metrics, packed_metrics = run(False), run(True)
    keys = [k for k, v in padded_metrics.items() if k.startswith(("train/rm/", "eval/rm/"))]
    assert "eval/rm/loss" in keys and "train/rm/loss" in keys
    assert {k: packed_metrics[k] for k in keys} == pytest.approx({k: padded_metrics[k] for k in keys},
                                                                  rel=1e-4, abs=1e-5)


# --- every architecture family padding-free is used for, windows included --------------------
WINDOW = 8  # shorter than most of LENGTHS: windowed layers must drop the far past


def family_model(family: str, attn: str = "sdpa"):
    """Tiny random-init models of the families in packing.PACKED_FAMILIES (window 8 where the
    family has sliding-window layers: all layers for Mistral and Phi-3, some for Qwen2, Qwen3
    and Gemma 3)."""
    from transformers import (Gemma3TextConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    if family in ("gpt_neox", "llama"):
        return tiny_model(family, attn)
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=1,
                  pad_token_id=PAD)
    config = {
        "mistral": lambda: MistralConfig(sliding_window=WINDOW, **common),
        "phi3": lambda: Phi3Config(sliding_window=WINDOW, **common),
        # Qwen2/Qwen3: layers from max_window_layers on are windowed (use_sliding_window).
        "qwen2": lambda: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **common),
        "qwen3": lambda: Qwen3Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                     head_dim=8, **common),
        # Gemma 3: windowed local layers interleaved with global ones (layer_types).
        "gemma3_text": lambda: Gemma3TextConfig(
            sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common),
    }[family]()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn, dtype=torch.float32)


FAMILIES = ["gpt_neox", "llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3_text"]


def test_families_under_test_are_the_packed_families():
    from rmjob_trainer.packing import PACKED_FAMILIES

    assert set(FAMILIES) == set(PACKED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rewards_equal_per_sequence_rewards_for_every_family(family):
    """Each sequence alone (no padding, the model's own sdpa) is the reference; sliding-window
    layers must not see further back than the window in the packed row either."""
    model = family_model(family)
    seqs = sequences()
    assert max(map(len, seqs)) > WINDOW
    with torch.no_grad():
        alone = torch.cat([get_reward(model, torch.tensor([s]), PAD) for s in seqs])
        packed = packed_rewards(model, collate_packed(seqs))
        padded_after_switch = get_reward(model, padded(seqs), PAD)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded_after_switch, alone, rtol=0, atol=1e-5)


def test_a_window_longer_than_every_sequence_masks_nothing(monkeypatch):
    """Mistral's 4,096-token window over shorter sequences hides nothing: plain causal calls,
    which skip the scores above the diagonal, as transformers drops such a mask."""
    from rmjob_trainer import packing
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    masks = []

    def spy(module, query, key, value, mask, **kwargs):
        masks.append(mask)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    model = family_model("mistral")
    seqs = sequences()
    model.config.sliding_window = max(map(len, seqs))  # read by every layer
    with torch.no_grad():
        alone = torch.cat([get_reward(model, torch.tensor([s]), PAD) for s in seqs])
        monkeypatch.setattr(packing, "sdpa_attention_forward", spy)
        packed = packed_rewards(model, collate_packed(seqs))
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert masks and all(mask is None for mask in masks)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_packed_gradients_equal_padded_with_sliding_windows(family):
    model = family_model(family)
    seqs = sequences()
    expected = bt_grads(model, get_reward(model, padded(seqs), PAD))
    got = bt_grads(model, packed_rewards(model, collate_packed(seqs)))
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_other_families_fall_back_to_padding_with_a_log_line(caplog):
    """A family not verified for packing (here OLMo 2) gets padded batches, the same rewards
    as per sequence, and one warning saying so."""
    from transformers import Olmo2Config

    config = Olmo2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, num_labels=1, pad_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    seqs = sequences()
    with torch.no_grad(), caplog.at_level("WARNING", logger="rmjob_trainer.packing"):
        alone = torch.cat([get_reward(model, torch.tensor([s]), PAD) for s in seqs])
        packed = packed_rewards(model, collate_packed(seqs))
        packed_rewards(model, collate_packed(seqs))
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    warnings = [r.getMessage() for r in caplog.records if r.name == "rmjob_trainer.packing"]
    assert len(warnings) == 1 and "olmo2" in warnings[0] and "padded" in warnings[0]


@pytest.mark.parametrize("family", ["mistral", "phi3", "qwen2", "qwen3", "gemma3_text"])
def test_varlen_model_keeps_the_window_on_a_batch_without_attention_mask(family):
    """Rows of equal length passed without attention_mask (no padding to mask): after the switch
    to sdpa_varlen, windowed layers still drop the far past, as plain sdpa does."""
    import copy

    model = family_model(family)
    reference = copy.deepcopy(model)  # plain sdpa
    rows = torch.randint(1, 97, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed_rewards(model, collate_packed(sequences()))
        assert model.config._attn_implementation == VARLEN_SDPA
        switched = model(input_ids=rows).logits.squeeze(-1)
        plain = reference(input_ids=rows).logits.squeeze(-1)
    torch.testing.assert_close(switched, plain, rtol=0, atol=1e-5)
