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
    ``batch_size``, ``remote`` as one dict per service (``RemoteRewardSpec.model_dump()``),
    ``env_rewards`` (an environment rewards each turn: no source is required) and ``torch_threads``
    (``reward.torch_threads``, or when empty ``"node"`` in a synchronous run and the reserved CPUs in
    an asynchronous one)."""
    rc = cfg.reward
    threads = rc.torch_threads or ("node" if cfg.rollout.max_staleness == 0 else max(1, int(rc.num_cpus)))
    return dict(functions=[(f.name, f.weight, f.kind) for f in rc.functions], model_path=rc.model_path,
                model_weight=rc.model_weight, batch_size=rc.batch_size, remote=[r.model_dump() for r in rc.remote],
                env_rewards=cfg.env.multi_turn, torch_threads=threads)
