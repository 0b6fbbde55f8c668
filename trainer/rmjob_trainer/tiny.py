"""Tiny random-init models for tests and the demo, built offline in about a second.

``build_tiny_model(path)`` trains a byte-level BPE tokenizer on the bundled dataset's text
and saves it with a freshly initialised causal LM (GPT-NeoX like pythia, or Llama), so that

    AutoTokenizer.from_pretrained(path)
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)

load it with no network, exactly like a Hub base model (the score head is then newly
initialised, as it is for EleutherAI/pythia-14m).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

BUNDLED_DATASET_DIR = Path(__file__).resolve().parent / "bundled_data" / "sentiment_tiny"

# pythia's special tokens: eos (also bos/unk) and a padding token that pythia's tokenizer has in
# its vocabulary but does not declare; open-instruct then adds "[PAD]". We declare it.
_SPECIAL_TOKENS = {
    "gpt_neox": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|padding|>"},
    "llama": {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"},
}


def bundled_texts() -> Iterator[str]:
    """Every message of the bundled dataset (both splits): the tokenizer's training text."""
    import pyarrow.parquet as pq

    for shard in sorted((BUNDLED_DATASET_DIR / "data").glob("*.parquet")):
        table = pq.read_table(shard, columns=["chosen", "rejected"])
        for column in ("chosen", "rejected"):
            for messages in table.column(column).to_pylist():
                for message in messages:
                    yield message["content"]


def train_tokenizer(vocab_size: int, special_tokens: dict[str, str]):
    """Byte-level BPE (GPT-2/pythia style) trained on the bundled text; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(special_tokens.values())),  # unique, in order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(bundled_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


def _model_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                  max_position_embeddings: int, token_ids: dict[str, int | None]):
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **token_ids,
    )
    if arch == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.25, **common)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=num_heads, **common)
    raise ValueError(f"arch must be 'gpt_neox' or 'llama', got {arch!r}")


def build_tiny_model(
    path: str | os.PathLike,
    *,
    arch: Literal["gpt_neox", "llama"] = "gpt_neox",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 1000,
    max_position_embeddings: int = 2048,
    pad_token: bool = True,
    seed: int = 0,
) -> Path:
    """Save a tiny random-init causal LM + tokenizer to ``path`` and return it.

    ``pad_token=False`` leaves the tokenizer without a pad token (like Llama's), for testing
    the trainer's pad-token handling. Same arguments, same files.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    special_tokens = dict(_SPECIAL_TOKENS[arch])
    if not pad_token:
        del special_tokens["pad_token"]
    tokenizer = train_tokenizer(vocab_size, special_tokens)

    config = _model_config(
        arch, len(tokenizer), hidden_size, num_layers, num_heads, max_position_embeddings,
        {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
