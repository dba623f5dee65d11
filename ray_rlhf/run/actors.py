"""Building the actors of a run: the learner group, the reward actor, the generator pool and the
weight broadcaster that connects them.

The classes run as actors are plain classes (:class:`~ray_rlhf.learning.learner.Learner`,
:class:`~ray_rlhf.rewards.scorer.RewardScorer`, :class:`~ray_rlhf.generation.generator.Generator`);
``ray.remote`` is applied here, with the resources from the config. The benchmarks build their
actors with the same functions. With fault injection configured (``faults.*``), the pool and the
learner group are built with their faults (:mod:`ray_rlhf.run.faults`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.generation.generator import Generator
from ray_rlhf.generation.pool import GeneratorPool, SharedSlots, request_capacity
from ray_rlhf.learning.group import LearnerGroup
from ray_rlhf.rewards.scorer import RewardScorer
from ray_rlhf.rewards.sources import reward_sources
from ray_rlhf.run.faults import FaultPlan, FaultyLearners, FaultyPool
from ray_rlhf.run.placement import Colocation, colocated_group
from ray_rlhf.sync.broadcaster import WeightBroadcaster

log = logging.getLogger(__name__)


def generator_kwargs(cfg: RunConfig, policy_path: str | Path, generator_id: str) -> dict[str, Any]:
    """The :class:`Generator` constructor arguments of a run."""
    g = cfg.generators
    return dict(model_path=str(policy_path), generator_id=generator_id, max_model_len=g.max_model_len,
                seed=cfg.seed, gpu_memory_utilization=g.gpu_memory_utilization if g.num_gpus else None,
                tensor_parallel_size=g.tensor_parallel_size, kv_cache_gib=g.kv_cache_gib,
                omp_threads_bind=g.omp_threads_bind, sleep_mode=cfg.placement == "colocated", env=env_spec(cfg),
                max_lora_rank=cfg.engine_max_lora_rank, partial=cfg.rollout.partial)


def env_spec(cfg: RunConfig) -> dict | None:
    """The generators' ``env`` argument (plain data): the environment and its limits; None for a
    single-turn run (``env.name`` and ``env.agent`` empty)."""
    e = cfg.env
    if not e.multi_turn:
        return None
    return dict(name=e.name, agent=e.agent, kwargs=dict(e.kwargs), max_turns=e.max_turns,
                step_timeout_s=e.step_timeout_s, max_total_tokens=cfg.rollout.max_total_tokens,
                num_cpus=e.num_cpus, num_actors=e.num_actors,
                scheduling=e.scheduling)


def generator_actor(cfg: RunConfig) -> Any:
    """The ``ray.remote`` Generator class with a run's resources (and ``generators.preload``).
    ``rollout.partial``: two concurrent calls, so weights can be delivered while a shard generates
    (the generation loop's own thread loads them)."""
    g = cfg.generators
    concurrency = {"max_concurrency": 2} if cfg.rollout.partial else {}
    return ray.remote(num_cpus=g.num_cpus, num_gpus=g.num_gpus, max_restarts=0, **concurrency,
                      **preload_options(g.preload))(Generator)


def preload_options(libraries: list[str]) -> dict[str, Any]:
    """Actor options that start the actor's process with ``libraries`` in ``LD_PRELOAD`` (in front of
    any it inherits); ``{}`` for none. Ray merges ``env_vars`` with the job's runtime environment."""
    if not libraries:
        return {}
    import os

    preload = ":".join([*libraries, *filter(None, [os.environ.get("LD_PRELOAD")])])
    return {"runtime_env": {"env_vars": {"LD_PRELOAD": preload}}}


def start_reward(cfg: RunConfig, columns: list[str]) -> Any:
    """The reward actor. Scoring is stateless: Ray restarts a dead one and retries the call."""
    rc = cfg.reward
    actor = ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_restarts=3, max_task_retries=3)(RewardScorer)
    return actor.remote(**reward_sources(cfg), columns=columns)


def learner_group(cfg: RunConfig, policy_path: str | Path, faults: FaultPlan | None = None,
                  shared_pg: Any = None) -> LearnerGroup:
    """The learner group of a run; with ``faults`` (learner or rollout faults configured), one that
    breaks at the configured step (:class:`~ray_rlhf.run.faults.FaultyLearners`). ``shared_pg``: the
    colocated placement group (rank ``i`` at bundle ``i``)."""
    if faults is not None:
        return FaultyLearners(cfg, policy_path, plan=faults, shared_pg=shared_pg)
    return LearnerGroup(cfg, policy_path, shared_pg=shared_pg)


@dataclass
class RunActors:
    """The live actors of one run."""

    learners: LearnerGroup
    reward: Any
    """The reward actor (a ``RewardScorer``)."""
    broadcaster: WeightBroadcaster
    pool: GeneratorPool
    capacity_requested: bool
    """Whether the autoscaler was asked for room for ``generators.max`` generators."""
    faults: FaultPlan | None = None
    """The faults the pool and the learner group inject (``faults.*``); None: none."""
    colocation: Colocation | None = None
    """``placement=colocated``: the phase order (engines asleep while the learner trains); None: split."""
    shared_pg: Any = None
    """``placement=colocated``: the placement group whose bundle ``i`` holds generator ``i`` and rank ``i``."""

    @classmethod
    def start(cls, cfg: RunConfig, policy_path: str | Path, columns: list[str],
              faults: FaultPlan | None = None) -> RunActors:
        """``columns``: the dataset's extra columns (the reward functions' keyword arguments).
        ``faults``: with a fault that breaks an actor, the pool is a
        :class:`~ray_rlhf.run.faults.FaultyPool` and the learner group a
        :class:`~ray_rlhf.run.faults.FaultyLearners`; otherwise the plain ones."""
        faults = faults if faults is not None and faults.breaks_actors else None
        colocated = cfg.placement == "colocated"
        shared_pg = colocated_group(cfg) if colocated else None
        learners = learner_group(cfg, policy_path, faults, shared_pg)
        reward = start_reward(cfg, columns)
        learners.ready()
        ray.get(reward.ping.remote())  # surface construction errors before the generators start
        broadcaster = WeightBroadcaster(learners.source, cfg.sync.backend, cfg.sync.verify,
                                        group_backend="nccl" if cfg.learner.device == "cuda" else "gloo",
                                        verify_parts=cfg.sync.verify_parts,
                                        adapter=cfg.engine_max_lora_rank is not None)
        g = cfg.generators
        bundle = {"CPU": g.num_cpus, **({"GPU": g.num_gpus} if g.num_gpus else {})}
        capacity = False if colocated else request_capacity(bundle, cfg.pool_max)
        args = (generator_actor(cfg), lambda gid: generator_kwargs(cfg, policy_path, gid), bundle)
        kwargs = dict(size=g.num, min_size=cfg.pool_min, max_size=cfg.pool_max, on_join=broadcaster.join,
                      max_restarts=g.max_restarts, shard_timeout_s=g.shard_timeout_s,
                      shard_timeout_floor_s=g.shard_timeout_floor_s,
                      slots=SharedSlots(shared_pg, g.num) if colocated else None,
                      turns_per_sample=cfg.env.max_turns if cfg.env.multi_turn else 1,
                      env_timeout_s=cfg.env.step_timeout_s if cfg.env.multi_turn else 0.0)
        pool = (GeneratorPool(*args, **kwargs) if faults is None
                else FaultyPool(*args, plan=faults, reward=reward, **kwargs))
        return cls(learners, reward, broadcaster, pool, capacity, faults,
                   Colocation(cfg.output_dir) if colocated else None, shared_pg)

    def publish(self, version: int):
        """Weights ``version`` to every generator; the ones lost on the way are replaced (and join
        at ``version``)."""
        result = self.broadcaster.publish(version, self.pool.handles)
        if result.lost:
            self.pool.remove_lost(result.lost)
        return result

    def replace_learners(self, cfg: RunConfig, policy_path: str | Path) -> None:
        """A new learner group in place of one whose rank died (its weights: the initial model
        until a checkpoint is loaded); the broadcaster sends from its rank 0 from now on."""
        self.learners.shutdown()
        self.learners = learner_group(cfg, policy_path, self.faults, self.shared_pg)
        self.learners.ready()
        self.broadcaster.set_source(self.learners.source, self.pool.handles)

    def maybe_grow(self, max_size: int) -> None:
        """Elastic growth: add generators where the cluster has room now."""
        if len(self.pool) < max_size:
            added = self.pool.grow(timeout_s=1.0)
            if added:
                log.info("generator pool grew by %s to %d", added, len(self.pool))

    def shutdown(self) -> None:
        self.pool.shutdown()
        self.learners.shutdown()
        for free in (lambda: ray.kill(self.reward),
                     lambda: self.shared_pg is not None and remove_placement_group(self.shared_pg)):
            try:
                free()
            except Exception:  # noqa: BLE001 - already gone
                pass
