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

    def generators_to_kill(self, step: int) -> list[int]:
        """Pool positions to kill right after this step's shards are dispatched."""
        return [k.index for k in self.faults.kill_generator if k.step == step]

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
