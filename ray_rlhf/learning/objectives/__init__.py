"""Objectives: what one kind of training computes, run by the :class:`~ray_rlhf.learning.engine.Engine`.

:class:`Objective` is the seam; :class:`~ray_rlhf.learning.objectives.ppo.PPOObjective` PPO and its
critic-free estimators; :mod:`~ray_rlhf.learning.objectives.sft` (token NLL),
:mod:`~ray_rlhf.learning.objectives.rm` (Bradley-Terry on a sequence classifier) and
:mod:`~ray_rlhf.learning.objectives.dpo` (DPO / IPO on preference pairs).
"""

from ray_rlhf.learning.objectives.base import Objective
from ray_rlhf.learning.objectives.dpo import DPOObjective
from ray_rlhf.learning.objectives.ppo import PPOObjective, PPOStats
from ray_rlhf.learning.objectives.rm import RMObjective
from ray_rlhf.learning.objectives.sft import SFTObjective

__all__ = ["DPOObjective", "Objective", "PPOObjective", "PPOStats", "RMObjective", "SFTObjective"]
