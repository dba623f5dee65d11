"""A multi-turn game a tiny model can learn: each observation names a letter, and the turn's reward
is that letter's frequency in the model's reply (as :func:`ray_rlhf.rewards.rules.letter_frequency`
scores the demo's fixed ``e``, here with the letter the environment named).

Letters are drawn from ``letters`` with a generator seeded by the prompt row (its ``prompt_index``
when the row has one, else ``seed``), so a trajectory is reproducible. The game ends after ``turns``
turns (``done``); with ``env.max_turns`` lower, the run's limit ends it first (finish reason
``max_turns``).
"""

from __future__ import annotations

import random

from ray_rlhf.envs.base import Env, StepResult

__all__ = ["LetterGame", "letter_share"]


def letter_share(text: str, letter: str) -> float:
    """Fraction of ``text``'s characters equal to ``letter`` (case-insensitive); 0 for empty text."""
    return text.lower().count(letter.lower()) / len(text) if text else 0.0


class LetterGame(Env):
    """Name a letter, reward the reply by that letter's frequency, name the next one.

    Args:
        letters: the letters drawn from (vowels common in the tiny tokenizer's vocabulary).
        turns: turns after which the game says ``done``.
        seed: seed of the letter draws (mixed with the row's ``prompt_index`` when it has one).
    """

    def __init__(self, letters: str = "eaoi", turns: int = 2, seed: int = 0):
        self.letters, self.turns, self.seed = str(letters), int(turns), int(seed)
        self.rng = random.Random(seed)
        self.letter, self.turn = "e", 0

    def _say(self) -> str:
        self.letter = self.rng.choice(self.letters)
        return f"Use the letter {self.letter}."

    def reset(self, row: dict) -> str:
        self.rng = random.Random(f"{self.seed}:{row.get('prompt_index', '')}")
        self.turn = 0
        return self._say()

    def step(self, action: str) -> StepResult:
        letter = self.letter
        reward = letter_share(action, letter)
        self.turn += 1
        done = self.turn >= self.turns
        return StepResult(None if done else self._say(), reward, done, {"letter": letter})
