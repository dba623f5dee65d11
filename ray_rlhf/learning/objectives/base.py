"""The seam between the engine and an objective (PPO today; SFT, reward-model training, DPO next)."""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

from ray_rlhf.learning.batch import TensorBatch
from ray_rlhf.learning.engine import Engine, Forward, Micro, Prepared
from ray_rlhf.learning.stats import LearnerStats, Stats

P = TypeVar("P", bound=Prepared)


class Objective(Protocol[P]):
    """What one kind of training computes; the engine runs the passes, the update and the ranks.

    A step is ``prepare`` (once, without gradients), the engine's update (``loss`` for every
    micro-batch of every minibatch of every epoch), then ``finish``. Each returns a
    :class:`~ray_rlhf.learning.stats.Stats` record; the learner combines them with its own into
    one :attr:`stats_type` record, whose fields name their metric keys.
    """

    uses_critic: bool
    """The engine's model gets a value head (or a separate critic's) and the checkpoint saves it."""
    needs_reference: bool
    """The engine holds a frozen copy of the initial policy."""
    stats_type: type[LearnerStats]
    """The step's record: :class:`~ray_rlhf.learning.stats.LearnerStats` plus this objective's fields."""

    def prepare(self, batch: TensorBatch, engine: Engine) -> tuple[P, Stats]:
        """What is fixed during the update (forward passes through :meth:`Engine.gather`), and the
        rows to train on; its statistics over the whole batch."""
        ...

    def loss(self, micro: Micro[P], forward: Forward) -> tuple[torch.Tensor, Stats]:
        """One micro-batch's loss (the engine scales it for the ranks and backpropagates it): a sum
        over its tokens divided by a count of the whole minibatch (:attr:`Micro.num_tokens`), so
        that micro-batches and ranks add up. Its record's fields are token-weighted shares (or
        maxima) that the engine sums over passes and ranks and averages over optimizer steps."""
        ...

    def finish(self, prepared: P, stats: Stats, batch: TensorBatch) -> Stats:
        """After the update (e.g. the KL controller's step); statistics of the step."""
        ...
