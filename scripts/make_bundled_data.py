"""Generate the bundled preference dataset ``rmjob_trainer/bundled_data/sentiment_tiny``.

A synthetic, sentiment-style preference task in the shape of
trl-internal-testing/sentiment-trl-style: ``prompt`` (a string) plus ``chosen`` / ``rejected``
message lists (user prompt, assistant reply). The chosen reply is the more positive one.

It is built to be learnable by a tiny model trained from scratch in seconds, without being
trivially separable:

* chosen and rejected replies share their sentence skeletons, nouns and fillers and differ
  mostly in the sentiment words, so the model has to read them;
* each reply gets its own number of extra sentences, so length says nothing about the label;
* some sentiment words are negated ("not awful" in a chosen reply, "not lovely" in a
  rejected one), so single words are not enough;
* some pairs are mixed: the chosen reply contains a negative word and the rejected one a
  positive word, only the balance decides.

Deterministic: the same seed writes the same rows. Run from the repository root::

    python scripts/make_bundled_data.py
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT_DIR = Path(__file__).resolve().parents[1] / "trainer" / "rmjob_trainer" / "bundled_data" / "sentiment_tiny" / "data"

SUBJECTS = [
    "movie", "restaurant", "concert", "novel", "hotel", "museum", "bakery", "play", "album",
    "train ride", "city tour", "cafe", "festival", "lecture", "garden", "podcast", "game",
    "exhibition", "market", "ferry trip",
]
ASPECTS = [
    "service", "music", "story", "staff", "food", "view", "ending", "price", "room", "lighting",
    "pacing", "coffee", "crowd", "sound", "design", "acting", "menu", "weather", "guide", "seats",
]
POSITIVE = [
    "wonderful", "delightful", "excellent", "charming", "lovely", "brilliant", "pleasant",
    "superb", "joyful", "warm", "beautiful", "fantastic", "friendly", "memorable", "great",
    "inspiring", "gentle", "fresh", "cheerful", "splendid",
]
NEGATIVE = [
    "awful", "dreadful", "terrible", "boring", "dull", "horrible", "unpleasant", "miserable",
    "gloomy", "cold", "ugly", "disappointing", "rude", "forgettable", "bad", "tiresome",
    "harsh", "stale", "grim", "annoying",
]
NEGATION_RATE = 0.1
TIMES = ["last night", "on Sunday", "this morning", "after work", "during the holidays",
         "with my sister", "on a rainy evening", "for the first time", "with some old friends"]
PROMPT_OPENERS = [
    "We went to the {subject} {time}.",
    "I finally tried the {subject} everyone talks about {time}.",
    "My friends took me to the {subject} {time}.",
    "The {subject} downtown reopened and we visited {time}.",
]
PROMPT_DETAILS = [
    "The {aspect} was the first thing we noticed.",
    "It was busier than we expected.",
    "We stayed until the very end.",
    "Nobody in our group had been there before.",
    "The tickets were bought weeks in advance.",
]
PROMPT_ASKS = ["What did you think?", "How was it?", "Tell me about it.", ""]
# {a} slots take a sentiment word; the rest of the skeleton is shared by chosen and rejected.
REPLY_SENTENCES = [
    "The {aspect} was {a} and the {aspect2} felt {a}.",
    "Honestly, the whole {subject} was {a}.",
    "I found the {aspect} {a}, and the {aspect2} was {a} too.",
    "It was a {a} evening.",
    "The {aspect2} seemed {a} to everyone in our group.",
    "We talked about how {a} the {aspect} was on the way home.",
    "Overall it felt {a}.",
]


def _fill(template: str, slots: list[str], **names: str) -> str:
    text = template.format(a="{a}", **names)
    for word in slots:
        text = text.replace("{a}", word, 1)
    return text


def _reply(rng: random.Random, skeleton: list[str], words: list[str], names: dict[str, str]) -> str:
    """Fill a skeleton's sentiment slots, in order, from ``words``."""
    out, pos = [], 0
    for template in skeleton:
        n = template.count("{a}")
        out.append(_fill(template, words[pos:pos + n], **names))
        pos += n
    return " ".join(out)


def make_pair(rng: random.Random) -> dict:
    subject = rng.choice(SUBJECTS)
    aspect, aspect2 = rng.sample(ASPECTS, 2)
    names = {"subject": subject, "aspect": aspect, "aspect2": aspect2, "time": rng.choice(TIMES)}

    prompt = " ".join(
        part for part in (
            _fill(rng.choice(PROMPT_OPENERS), [], **names),
            *(_fill(d, [], **names) for d in rng.sample(PROMPT_DETAILS, rng.randint(0, 2))),
            rng.choice(PROMPT_ASKS),
        ) if part
    )

    shared = rng.sample(REPLY_SENTENCES, rng.randint(1, 3))
    skeletons = []
    for _ in range(2):  # chosen, rejected: same core, independent extra sentences
        extra = [s for s in rng.sample(REPLY_SENTENCES, rng.randint(0, 2)) if s not in shared]
        skeleton = shared + extra
        rng.shuffle(skeleton)
        skeletons.append(skeleton)

    replies = []
    for skeleton, main, other in ((skeletons[0], POSITIVE, NEGATIVE), (skeletons[1], NEGATIVE, POSITIVE)):
        n_slots = sum(t.count("{a}") for t in skeleton)
        words = [f"not {rng.choice(other)}" if rng.random() < NEGATION_RATE else rng.choice(main)
                 for _ in range(n_slots)]
        if n_slots >= 3 and rng.random() < 0.25:  # mixed reply: the majority still decides
            words[rng.randrange(n_slots)] = rng.choice(other)
        replies.append(_reply(rng, skeleton, words, names))

    def messages(reply: str) -> list[dict]:
        return [{"content": prompt, "role": "user"}, {"content": reply, "role": "assistant"}]

    return {"prompt": prompt, "chosen": messages(replies[0]), "rejected": messages(replies[1])}


def write_split(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=20240904)
    parser.add_argument("--train_rows", type=int, default=2000)
    parser.add_argument("--test_rows", type=int, default=300)
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    rows = [make_pair(rng) for _ in range(args.train_rows + args.test_rows)]
    write_split(rows[: args.train_rows], args.out_dir / "train-00000-of-00001.parquet")
    write_split(rows[args.train_rows:], args.out_dir / "test-00000-of-00001.parquet")
    print(f"wrote {args.train_rows} train and {args.test_rows} test rows to {args.out_dir}")


if __name__ == "__main__":
    main()
