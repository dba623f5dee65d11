"""A slow environment for benchmarks and tests of the multi-turn schedules: :class:`SleepyLetters`.

It plays :class:`~ray_rlhf.envs.letters.LetterGame` and sleeps in every ``step`` for a random time
(uniform in ``[min_s, max_s]``, drawn per instance: samples of one prompt sleep differently), as an
environment that runs code or calls a service would: under ``env.scheduling=turns`` the engine idles for the slowest
environment of every turn; under ``continuous`` it decodes the other trajectories meanwhile.
"""

from __future__ import annotations

import random
import time

from ray_rlhf.envs.base import StepResult
from ray_rlhf.envs.letters import LetterGame

__all__ = ["SleepyLetters"]


class SleepyLetters(LetterGame):
    """:class:`LetterGame` whose ``step`` sleeps ``uniform(min_s, max_s)`` seconds first.

    Args:
        min_s, max_s: the range of each step's sleep, in seconds.
        letters, turns, seed: as :class:`LetterGame`.
    """

    def __init__(self, min_s: float = 0.05, max_s: float = 0.2, letters: str = "eaoi", turns: int = 2,
                 seed: int = 0):
        super().__init__(letters=letters, turns=turns, seed=seed)
        self.min_s, self.max_s = float(min_s), float(max_s)
        self.sleep_rng = random.Random(seed)

    def reset(self, row: dict) -> str:
        self.sleep_rng = random.Random(f"sleep:{self.seed}:{row.get('prompt_index', '')}:{id(self)}")
        return super().reset(row)

    def step(self, action: str) -> StepResult:
        time.sleep(self.sleep_rng.uniform(self.min_s, self.max_s))
        return super().step(action)
