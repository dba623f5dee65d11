"""A run's reward sources, from its config: the reward actor's constructor arguments.

One function, so the driver's preflight check (:func:`ray_rlhf.preflight.check_reward`) and the
reward actor it starts (:func:`ray_rlhf.run.actors.start_reward`) see the same sources. The
arguments stay plain data (tuples, dicts), so the actor needs no config classes.
"""

from __future__ import annotations

from ray_rlhf.config.schema import RunConfig

__all__ = ["reward_sources"]


def reward_sources(cfg: RunConfig) -> dict:
    """The :class:`~ray_rlhf.rewards.scorer.RewardScorer` constructor arguments of a run (all but
    ``columns``): ``functions`` as ``(spec, weight, kind)``, ``model_path``, ``model_weight``,
    ``batch_size``, ``remote`` as one dict per service (``RemoteRewardSpec.model_dump()``) and
    ``env_rewards`` (an environment rewards each turn: no source is required)."""
    rc = cfg.reward
    return dict(functions=[(f.name, f.weight, f.kind) for f in rc.functions], model_path=rc.model_path,
                model_weight=rc.model_weight, batch_size=rc.batch_size, remote=[r.model_dump() for r in rc.remote],
                env_rewards=cfg.env.multi_turn)
