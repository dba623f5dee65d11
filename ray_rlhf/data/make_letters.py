"""Make the bundled letters chat set: "write with many e's" requests, reproducibly.

    python -m ray_rlhf.data.make_letters            # rewrites ray_rlhf/data/bundled/letters_chat.parquet
    python -m ray_rlhf.data.make_letters --out x.parquet --num 100 --seed 1

A verifiable task a tiny random-init policy can learn on CPU: each row asks for text rich in one
letter, and ``ray_rlhf.rewards.verifiable:target_letter_frequency`` scores a response by the
fraction of its characters equal to the row's ``letter``. Columns (schema :data:`SCHEMA`):

* ``messages``: the chat, a list of ``{role, content}``: an optional system message, then one
  short user message (under 30 tokens of the tiny 512-token BPE) naming the target letter;
* ``letter``: the target letter, one of :data:`LETTERS`, each used equally often;
* ``data_source``: ``"letters"``.

The same ``--seed`` and ``--num`` always give the same rows in the same order.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow as pa

from ray_rlhf.data.prompts import bundled_letters_path

LETTERS = ["e", "a"]
"""Target letters: the two commonest in English, so a random policy already scores above zero
(~0.07) and a tiny one learns the task on CPU in a few dozen steps (measured with GRPO on the tiny
preset: 0.076 to 0.144 in 16 steps with 2 letters; with 7 letters only 0.05 to 0.07 in 24 steps --
a 1.8 M-parameter random model barely learns to read which letter the prompt names)."""

DATA_SOURCE = "letters"

SYSTEMS = [
    "You are a playful writer.",
    "You love word games.",
    "Answer in one short line.",
    "You are a helpful assistant.",
]
"""System messages; a row has one with probability :data:`SYSTEM_PROBABILITY`."""

SYSTEM_PROBABILITY = 0.5

TOPICS = ["the sea", "a cat", "trees", "the moon", "bread", "rain", "a dog", "snow",
          "music", "a fox", "stars", "a town", "winter", "a boat", "bees", "a garden"]

TEMPLATES = [
    "Write a short sentence with many {letter}'s.",
    "Use the letter {letter} as much as you can.",
    "Write a line full of {letter}'s.",
    "Say something with lots of {letter}'s.",
    "Write words with many {letter}'s.",
    "Write about {topic} with many {letter}'s.",
    "Tell me about {topic}, using many {letter}'s.",
    "A line about {topic}, heavy on {letter}:",
    "Describe {topic} with lots of {letter}'s.",
]

SCHEMA = pa.schema([
    pa.field("messages", pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))),
    pa.field("letter", pa.string()),
    pa.field("data_source", pa.string()),
])
"""The file's schema: ``messages: list<struct<role: string, content: string>>``, ``letter``, ``data_source``."""


def generate_rows(num: int = 128, seed: int = 0) -> list[dict]:
    """``num`` rows (dicts with the :data:`SCHEMA` columns), letters balanced, drawn with ``random.Random(seed)``.

    Row ``i`` before shuffling targets ``LETTERS[i % len(LETTERS)]``; user messages are distinct
    per letter. The rows are shuffled at the end so letters are mixed.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < num:
        attempts += 1
        if attempts > num * 100:
            raise ValueError(f"cannot make {num} distinct rows from the templates")
        letter = LETTERS[len(rows) % len(LETTERS)]
        user = rng.choice(TEMPLATES).format(letter=letter, topic=rng.choice(TOPICS))
        system = rng.choice(SYSTEMS) if rng.random() < SYSTEM_PROBABILITY else None
        if (letter, user) in seen:
            continue
        seen.add((letter, user))
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        rows.append({"messages": messages, "letter": letter, "data_source": DATA_SOURCE})
    rng.shuffle(rows)
    return rows


def write_letters(out, num: int = 128, seed: int = 0) -> Path:
    """Write :func:`generate_rows` to a Parquet file with schema :data:`SCHEMA`."""
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(generate_rows(num, seed), schema=SCHEMA), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output Parquet file (default: the bundled letters set)")
    parser.add_argument("--num", type=int, default=128, help="number of rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_letters(args.out or bundled_letters_path(), num=args.num, seed=args.seed)
    print(f"wrote {args.num} rows to {out}")


if __name__ == "__main__":
    main()
