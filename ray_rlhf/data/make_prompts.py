"""Make the bundled prompt set: short, templated English sentence starts, reproducibly.

    python -m ray_rlhf.data.make_prompts            # rewrites ray_rlhf/data/bundled/prompts.parquet
    python -m ray_rlhf.data.make_prompts --out x.parquet --num 100 --seed 1

The same ``--seed`` and ``--num`` always give the same prompts in the same order.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ["Mia", "Tom", "Lena", "Sam", "Nina", "Omar", "Priya", "Ben", "Hana", "Kofi", "Julia", "Eli"]
ANIMALS = ["fox", "cat", "dog", "owl", "rabbit", "horse", "bear", "frog", "kitten", "goat", "mouse", "whale"]
ADJECTIVES = ["small", "brave", "quiet", "happy", "curious", "little", "tired", "clever", "kind", "young", "shy", "proud"]
PLACES = ["forest", "river", "garden", "farm", "city", "beach", "library", "school", "market", "mountain", "park", "station"]
THINGS = ["map", "stone", "box", "book", "boat", "key", "letter", "drum", "kite", "lamp", "cake", "bicycle"]
TOPICS = ["the rain", "the moon", "bread", "friendship", "the sea", "winter", "bees", "music", "trees", "the stars", "sleep", "snow"]
TIMES = ["One morning", "Last summer", "Every night", "One rainy day", "Long ago", "After school", "At noon", "In the spring"]
FEELINGS = ["happy", "sad", "nervous", "excited", "calm", "proud", "surprised", "hopeful"]

TEMPLATES = [
    "Once upon a time, a {adj} {animal}",
    "{time}, {name} went to the {place}",
    "The {adj} {animal} found a {thing}.",
    "{name} wanted a new {thing}, so",
    "A story about a {adj} {animal}:",
    "Write one sentence about {topic}.",
    "Describe a {adj} {place}.",
    "Why do people like {topic}?",
    "Question: Where does a {animal} live? Answer:",
    "{name} felt {feeling} because",
    "At the {place}, the {animal}",
    "{time}, the {adj} {animal} said,",
    "A fun fact about {topic} is that",
    "{name} and the {animal} walked to the {place}.",
    "Some advice about {topic}:",
    "The {thing} in the {place} was",
]


def generate_prompts(num: int = 384, seed: int = 0) -> list[str]:
    """``num`` distinct prompts, drawn from :data:`TEMPLATES` with a ``random.Random(seed)``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    attempts = 0
    while len(prompts) < num:
        attempts += 1
        if attempts > num * 100:
            raise ValueError(f"cannot make {num} distinct prompts from the templates")
        template = rng.choice(TEMPLATES)
        text = template.format(
            adj=rng.choice(ADJECTIVES),
            animal=rng.choice(ANIMALS),
            name=rng.choice(NAMES),
            place=rng.choice(PLACES),
            thing=rng.choice(THINGS),
            topic=rng.choice(TOPICS),
            time=rng.choice(TIMES),
            feeling=rng.choice(FEELINGS),
        )
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts


def write_prompts(out, num: int = 384, seed: int = 0) -> Path:
    """Write :func:`generate_prompts` to a Parquet file with one string column ``prompt``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": pa.array(generate_prompts(num, seed), type=pa.string())})
    pq.write_table(table, out)
    return out


def main(argv: list[str] | None = None) -> None:
    from ray_rlhf.data.prompts import bundled_prompts_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output Parquet file (default: the bundled prompt set)")
    parser.add_argument("--num", type=int, default=384, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_prompts(args.out or bundled_prompts_path(), num=args.num, seed=args.seed)
    print(f"wrote {args.num} prompts to {out}")


if __name__ == "__main__":
    main()
