"""Synthetic preference pairs with HH-RLHF-like lengths, generated deterministically.

Lengths are what the benchmark is about: padded batches pay for the longest sequence of the
batch, so the spread matters. Prompt and response word counts are log-normal (long-tailed,
like HH-RLHF), which with the tiny tokenizer gives a median of ~150 tokens per sequence and a
tail past 512 (those pairs are filtered by ``max_token_length``, identically for both trainers).

Two shapes (``DATASETS``): ``single-turn`` (one user prompt, then the two responses: a short
shared prefix) and ``multi-turn`` (1-8 earlier user/assistant exchanges before the final
prompt, as in HH-RLHF or UltraFeedback conversations: chosen and rejected differ only in the
last assistant message, so most of each sequence is the shared conversation).

The preference is learnable but noisy: every word of a response is drawn from the bundled
vocabulary, with a few sentiment words mixed in; the chosen response leans positive, the
rejected one negative. Short responses are often ambiguous, so accuracy stays below 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

POSITIVE = ("beautiful brilliant charming cheerful delightful excellent fantastic friendly great joyful "
            "lovely pleasant splendid superb wonderful warm memorable inspiring").split()
NEGATIVE = ("annoying awful bad boring disappointing dreadful dull forgettable gloomy grim harsh horrible "
            "miserable rude stale terrible tiresome ugly unpleasant").split()
NEUTRAL = ("the was and to about we in felt not everyone on our it a evening whole found too seemed group "
           "talked how way home overall first what did you think downtown reopened visited went finally "
           "tried talks tell my friends took with nobody had been there before stayed until very end thing "
           "noticed busier than expected tickets were bought weeks advance menu lighting acting design "
           "pacing view price food museum concert market ferry garden hotel music story service").split()

PROMPT_MEDIAN_WORDS, RESPONSE_MEDIAN_WORDS, SIGMA = 45, 60, 0.8
# multi-turn: earlier exchanges (their number uniform in 1..MAX_EARLIER_EXCHANGES) of shorter
# messages: ~400 tokens per sequence, at most ~800 (the benchmark's multi-turn limit is 1024)
MAX_EARLIER_EXCHANGES, TURN_USER_MEDIAN_WORDS, TURN_ASSISTANT_MEDIAN_WORDS, FINAL_RESPONSE_MEDIAN_WORDS = 8, 18, 30, 35
LEAN = {"chosen": (0.08, 0.02), "rejected": (0.02, 0.08)}  # (P(positive word), P(negative word))


def _lognormal_words(rng: np.random.Generator, median: int, sigma: float = SIGMA) -> int:
    return max(1, int(rng.lognormal(math.log(median), sigma)))


def _words(rng: np.random.Generator, n: int, p_positive: float = 0.0, p_negative: float = 0.0) -> str:
    kind = rng.choice(3, size=n, p=[1 - p_positive - p_negative, p_positive, p_negative])
    pools = (NEUTRAL, POSITIVE, NEGATIVE)
    return " ".join(pools[k][rng.integers(len(pools[k]))] for k in kind)


def make_pairs(n: int, seed: int) -> list[dict]:
    """``n`` rows of ``{"chosen": messages, "rejected": messages}`` sharing a user prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = [{"role": "user", "content": _words(rng, _lognormal_words(rng, PROMPT_MEDIAN_WORDS))}]
        row = {}
        for side, (p_positive, p_negative) in LEAN.items():
            response = _words(rng, _lognormal_words(rng, RESPONSE_MEDIAN_WORDS), p_positive, p_negative)
            row[side] = prompt + [{"role": "assistant", "content": response}]
        rows.append(row)
    return rows


def make_multi_turn_pairs(n: int, seed: int) -> list[dict]:
    """``n`` conversations: earlier exchanges (neutral words with both sentiments, shared by the
    pair), a final user prompt, then the chosen and the rejected last assistant message."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        conversation = []
        for _ in range(rng.integers(1, MAX_EARLIER_EXCHANGES + 1)):
            conversation += [
                {"role": "user", "content": _words(rng, _lognormal_words(rng, TURN_USER_MEDIAN_WORDS, 0.5))},
                {"role": "assistant",
                 "content": _words(rng, _lognormal_words(rng, TURN_ASSISTANT_MEDIAN_WORDS, 0.5), 0.04, 0.04)},
            ]
        conversation.append({"role": "user", "content": _words(rng, _lognormal_words(rng, TURN_USER_MEDIAN_WORDS, 0.5))})
        row = {}
        for side, (p_positive, p_negative) in LEAN.items():
            response = _words(rng, _lognormal_words(rng, FINAL_RESPONSE_MEDIAN_WORDS, 0.6), p_positive, p_negative)
            row[side] = conversation + [{"role": "assistant", "content": response}]
        rows.append(row)
    return rows


DATASETS = {"multi-turn": make_multi_turn_pairs, "single-turn": make_pairs}


def write_dataset(path: Path, train_pairs: int, eval_pairs: int, seed: int = 0, shape: str = "single-turn") -> Path:
    """The pairs of ``DATASETS[shape]`` in the Hub layout (``data/{train,test}-00000-of-00001.parquet``)."""
    from datasets import Dataset

    (path / "data").mkdir(parents=True, exist_ok=True)
    for split, n, split_seed in (("train", train_pairs, seed), ("test", eval_pairs, seed + 1)):
        Dataset.from_list(DATASETS[shape](n, split_seed)).to_parquet(
            str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path
