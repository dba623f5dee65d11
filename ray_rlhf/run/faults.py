"""Fault injection (config ``faults.*``): the failures the tests and operators rehearse.

Each fault is injected the way it happens in production (``ray.kill`` of a live actor), so the
system finds out through its ordinary paths: a failed call, a missing answer.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from ray_rlhf.config.schema import FaultsConfig

log = logging.getLogger(__name__)


class FaultPlan:
    """When to break what, from ``faults.*``."""

    def __init__(self, faults: FaultsConfig):
        self.faults = faults
        self._done: set[int] = set()

    def generators_to_kill(self, step: int) -> list[int]:
        """Pool positions to kill right after this step's shards are dispatched."""
        return [k.index for k in self.faults.kill_generator if k.step == step]

    def generators_to_hang(self, step: int) -> list[int]:
        """Pool positions that stop answering just before this step's shards are dispatched."""
        return [k.index for k in self.faults.hang_generator if k.step == step]

    def before_update(self, step: int, learners: Any) -> None:
        """``faults.kill_learner_at_step``: kill learner rank 0 while it updates (the first time
        only: the recovered run replays this step)."""
        if self.faults.kill_learner_at_step == step and step not in self._done:
            self._done.add(step)
            log.warning("fault injection: killing learner rank 0 during the update of step %d", step)
            learners.kill_rank_during_next_step(0)

    def before_reward(self, step: int, reward_actor: Any) -> None:
        """``faults.kill_reward_at_step``: kill the reward actor; Ray restarts it (``max_restarts``)
        and the scoring call is retried on the new instance."""
        if self.faults.kill_reward_at_step == step:
            log.warning("fault injection: killing the reward actor (Ray restarts it)")
            ray.kill(reward_actor, no_restart=False)

    def stop_after(self, step: int, last_step: int) -> bool:
        """``faults.stop_after_step``: exit as if preempted after this step's checkpoint."""
        if self.faults.stop_after_step == step and step < last_step:
            log.warning("fault injection: stopping after step %d (re-run the same command to resume)", step)
            return True
        return False
