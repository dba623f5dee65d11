"""The learner ranks of a run, as the driver sees them: one owner, a few verbs.

:class:`LearnerGroup` starts the :class:`~ray_rlhf.learning.learner.Learner` actor(s) and is the
only code that talks to them: :meth:`~LearnerGroup.step` (one PPO update on a scored batch,
passed by ObjectRef), :meth:`~LearnerGroup.save` / :meth:`~LearnerGroup.load` (the learner's part
of a checkpoint), and :attr:`~LearnerGroup.source`, the rank whose weights the broadcaster sends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.learning.learner import Learner, LearnerStats


def learner_kwargs(cfg: RunConfig, policy_path: str | Path) -> dict[str, Any]:
    """The :class:`Learner` constructor arguments of a run (also used by the benchmarks)."""
    lc = cfg.learner
    return dict(model_path=str(policy_path), ppo=cfg.ppo, kl=cfg.kl, seed=cfg.seed, device=lc.device,
                temperature=cfg.rollout.temperature, critic_path=cfg.model.critic_path,
                torch_threads=lc.torch_threads)


class LearnerGroup:
    """The learner actor(s) of one run."""

    def __init__(self, cfg: RunConfig, policy_path: str | Path):
        lc = cfg.learner
        actor = ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, max_restarts=0)(Learner)
        self.ranks = [actor.remote(**learner_kwargs(cfg, policy_path))]

    @property
    def source(self) -> Any:
        """The rank that exports weights to the generators (a ``WeightSource``)."""
        return self.ranks[0]

    def ready(self) -> None:
        """Wait until every rank is built (surfaces construction errors now)."""
        ray.get([r.ping.remote() for r in self.ranks])

    def step(self, batch: Any) -> LearnerStats:
        """One PPO update on a scored :class:`~ray_rlhf.records.RolloutBatch` (or its ObjectRef)."""
        return ray.get(self.ranks[0].step.remote(batch))

    def save(self, directory: str | Path) -> None:
        ray.get(self.ranks[0].save_state.remote(str(directory)))

    def load(self, directory: str | Path) -> None:
        ray.get(self.ranks[0].load_state.remote(str(directory)))

    def shutdown(self) -> None:
        for r in self.ranks:
            try:
                ray.kill(r)
            except Exception:  # noqa: BLE001 - already gone
                pass
