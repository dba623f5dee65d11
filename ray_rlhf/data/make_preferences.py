"""Make the bundled SFT and preference sets for the tiny model's letters task, offline.

    python -m ray_rlhf.data.make_preferences          # rewrites ray_rlhf/data/bundled/{sft,prefs}_letters.jsonl
    python -m ray_rlhf.data.make_preferences --out-dir d --num 100 --seed 1

The prompts are the letters chat set's (:func:`ray_rlhf.data.make_letters.generate_rows`: a chat
asking for text rich in one ``letter``). Completions are short lines of words drawn from
:data:`WORDS`, seeded:

* ``sft_letters.jsonl``: ``messages`` = the chat plus an assistant answer built from the words
  with the most of the row's letter;
* ``prefs_letters.jsonl``: ``prompt`` (the chat), ``chosen`` and ``rejected``: a line of the words
  richest in the target letter against a line of words without it (and at most one rich word),
  ``chosen`` the one with the higher frequency of the letter
  (``ray_rlhf.rewards.verifiable:target_letter_frequency``), ``letter``, and ``margin`` = the
  difference of the two frequencies times 10. Pairs of equal frequency are redrawn. (Two lines
  drawn from all the words differ too little for the tiny model to generalise from 128 pairs:
  its held-out accuracy stayed near 0.5.)

The same ``--seed`` and ``--num`` always give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from importlib import resources
from pathlib import Path

from ray_rlhf.data.make_letters import generate_rows

WORDS = ["the", "sea", "tree", "bee", "green", "eye", "keep", "seen", "deep", "free", "area", "banana",
         "papaya", "java", "salad", "data", "cat", "dog", "sun", "moon", "box", "fox", "rain", "snow"]
"""Words rich in ``e`` or ``a`` and words with neither."""


def frequency(text: str, letter: str) -> float:
    """Fraction of ``text``'s characters equal to ``letter`` (as ``target_letter_frequency``)."""
    return text.lower().count(letter) / max(len(text), 1)


def _line(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))


def generate(num: int = 128, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(sft_rows, preference_rows)``, ``num`` of each."""
    rng = random.Random(seed)
    sft, prefs = [], []
    for row in generate_rows(num, seed):
        letter, chat = row["letter"], row["messages"]
        rich = sorted(WORDS, key=lambda w: -frequency(w, letter))[:8]
        sft.append({"messages": chat + [{"role": "assistant", "content": _line(rng, rich)}], "letter": letter})
        poor = [w for w in WORDS if letter not in w]
        while True:  # a line of rich words against a line with at most one rich word
            a, b = _line(rng, rich), _line(rng, poor[:-1] + [rng.choice(rich)])
            fa, fb = frequency(a, letter), frequency(b, letter)
            if fa != fb:
                break
        chosen, rejected = (a, b) if fa > fb else (b, a)
        prefs.append({"prompt": chat, "chosen": chosen, "rejected": rejected, "letter": letter,
                      "margin": round(abs(fa - fb) * 10, 4)})
    return sft, prefs


def write(out_dir, num: int = 128, seed: int = 0) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft, prefs = generate(num, seed)
    paths = out / "sft_letters.jsonl", out / "prefs_letters.jsonl"
    for path, rows in zip(paths, (sft, prefs)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(resources.files("ray_rlhf.data") / "bundled"))
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for p in write(args.out_dir, args.num, args.seed):
        print(p)


if __name__ == "__main__":
    main()
