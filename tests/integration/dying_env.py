"""A :class:`~ray_rlhf.envs.letters.LetterGame` whose generator process dies in the middle of a
trajectory, once per run: loaded by the generator actors as
``tests.integration.dying_env:LetterGameDiesOnce`` (they import it from the repository root).

The first time any trajectory of the run reaches its first ``step`` -- the model has answered
turn 1, the environment is about to answer -- the process exits (``os._exit``, as a crash or an OOM
kill would end it), having created ``marker`` (atomically: one generator wins), so that the re-run
of its shard on another generator goes through. Only in an actor: the driver's preflight probe of
the class goes through. Everything else (letters, rewards) is LetterGame's, so a run with it must
equal a run with LetterGame.
"""

from __future__ import annotations

import os

from ray_rlhf.envs.base import StepResult
from ray_rlhf.envs.letters import LetterGame


def _in_an_actor() -> bool:
    """True in a Ray actor (a generator); False in the driver, where preflight probes the class."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class LetterGameDiesOnce(LetterGame):
    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = str(marker)

    def step(self, action: str) -> StepResult:
        if self.turn == 0 and _in_an_actor() and not os.path.exists(self.marker):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return super().step(action)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(1)
        return super().step(action)
