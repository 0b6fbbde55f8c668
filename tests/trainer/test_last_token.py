"""The reward is read at each sequence's true last token, whatever the padding and even when the
pad token is the EOS token (Llama 3 style tokenizers; TRL#937, TRL#2758, transformers#35352)."""

import pytest
import torch


@pytest.fixture(scope="module")
def pad_is_eos(tiny_llama_no_pad_dir):
    """A model and sequences that all end with EOS, which the tokenizer also pads with."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_no_pad_dir)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_no_pad_dir, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    texts = ["The food was splendid.", "Bad, grim and annoying service.", "It was a charming evening and the view was lovely.", "Fine"]
    sequences = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert len({len(s) for s in sequences}) == len(sequences)  # every sequence but the longest is padded
    return model, tokenizer, sequences


def _unpadded(model, sequences) -> torch.Tensor:
    from rmjob_trainer.model import reward_at_last_token

    with torch.no_grad():
        return torch.cat([reward_at_last_token(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool))
                          for s in sequences])


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_training_batches_with_pad_equal_to_eos_give_the_unpadded_rewards(pad_is_eos, padding_free):
    from datasets import Dataset

    from rmjob_trainer.model import RewardModel
    from rmjob_trainer.train import CHOSEN, REJECTED, collate

    model, tokenizer, sequences = pad_is_eos
    dataset = Dataset.from_dict({CHOSEN: sequences[:2], REJECTED: sequences[2:]})
    batch = collate(dataset, [0, 1], tokenizer.pad_token_id, padding_free, torch.device("cpu"))
    with torch.no_grad():
        rewards = RewardModel(model, tokenizer.pad_token_id, padding_free)(batch)
    torch.testing.assert_close(rewards, _unpadded(model, sequences), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_get_reward_with_attention_mask_reads_the_last_token_on_either_padding_side(pad_is_eos, side):
    from rmjob_trainer.model import get_reward

    model, tokenizer, sequences = pad_is_eos
    tokenizer.padding_side = side
    batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
    with torch.no_grad():
        rewards = get_reward(model, batch["input_ids"], tokenizer.pad_token_id, batch["attention_mask"])
    torch.testing.assert_close(rewards, _unpadded(model, sequences), atol=1e-5, rtol=1e-5)


def test_get_reward_refuses_to_guess_the_padding_when_pad_is_eos(pad_is_eos):
    from rmjob_trainer.model import get_reward

    model, tokenizer, sequences = pad_is_eos
    ids = torch.tensor([sequences[1] + [tokenizer.pad_token_id] * (len(sequences[0]) - len(sequences[1]))])
    with pytest.raises(ValueError, match="pad_token_id .* is the EOS token.*pass attention_mask"):
        get_reward(model, ids, tokenizer.pad_token_id)
