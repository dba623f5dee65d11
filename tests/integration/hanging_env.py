"""A :class:`~ray_rlhf.envs.letters.LetterGame` whose synchronous ``step`` hangs (an hour) for the
prompt with ``prompt_index`` 0: the ``env.step_timeout_s`` test of environments in actors of their own
(``tests.integration.hanging_env:LetterGameHangs``)."""

from __future__ import annotations

import time

from ray_rlhf.envs.base import StepResult
from ray_rlhf.envs.letters import LetterGame


class LetterGameHangs(LetterGame):
    def reset(self, row: dict) -> str:
        self.hangs = row.get("prompt_index") == 0
        return super().reset(row)

    def step(self, action: str) -> StepResult:
        if self.hangs:
            time.sleep(3600)
        return super().step(action)
