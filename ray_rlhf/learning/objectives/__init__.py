"""Objectives: what one kind of training computes, run by the :class:`~ray_rlhf.learning.engine.Engine`.

:class:`Objective` is the seam; :class:`~ray_rlhf.learning.objectives.ppo.PPOObjective` the one
built so far (PPO and its critic-free estimators).
"""

from ray_rlhf.learning.objectives.base import Objective
from ray_rlhf.learning.objectives.ppo import PPOObjective, PPOStats

__all__ = ["Objective", "PPOObjective", "PPOStats"]
