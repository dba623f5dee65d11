"""The PPO driver: one cycle per step, one line per phase, each phase timed.

    prompts -> generate (GeneratorPool: vLLM, one RolloutBatch ref per shard)
            -> score    (reward actor: the refs in, a scored batch ref + a small summary out)
            -> learn    (LearnerGroup: the scored batch by ref; old/ref logprobs, values, GAE, PPO)
            -> sync     (WeightBroadcaster: version v+1 into every engine, checksum-verified)
            -> log, checkpoint

Token arrays travel between actors as ObjectRefs; the driver fetches the summary it logs (and the
scored batch only when rollouts are logged). Started by ``python -m ray_rlhf.train`` or
``ray-rlhf train``; it joins ``RAY_ADDRESS`` (or ``ray.address``) when set, as under
``ray job submit``, and starts a local Ray otherwise. Re-running the same command resumes from the
newest complete checkpoint (``checkpoint.resume=auto``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import ray

from ray_rlhf import preflight
from ray_rlhf.config import RunConfig, to_yaml
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.generation.pool import PoolEvents, make_shards
from ray_rlhf.learning.learner import LearnerStats
from ray_rlhf.metrics import MetricsLogger, RolloutLogger, rollout_stats
from ray_rlhf.records import RolloutSummary, SamplingSpec
from ray_rlhf.run import state
from ray_rlhf.run.actors import RunActors
from ray_rlhf.run.cluster import init_ray
from ray_rlhf.run.faults import FaultPlan
from ray_rlhf.sync.types import SyncResult

log = logging.getLogger("ray_rlhf")


class PhaseTimer:
    """``with timer("generate"): ...`` records the seconds of each phase of one step."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = time.perf_counter() - t0


def run(cfg: RunConfig, on_finish: Callable[[RunActors], None] | None = None,
        on_step_end: Callable[[int, RunActors], None] | None = None) -> Path:
    """Run (or resume) a PPO training; returns the output directory.

    ``on_finish(actors)`` is called with the live actors after the last step, before they are
    shut down (the benchmarks read each actor's memory there); ``on_step_end(step, actors)`` after
    each step is logged and checkpointed, before the pool tries to grow (tests change the cluster
    there).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(cfg.output_dir)
    inputs = preflight.check_run(cfg)  # cheap checks of everything the user gave, before Ray
    log.info("resolved config:\n%s", to_yaml(cfg))
    (out / "config.yaml").write_text(to_yaml(cfg))

    init_ray(cfg)
    actors = RunActors.start(cfg, inputs.policy_path)
    stream, faults = PromptStream(inputs.prompts, seed=cfg.seed), FaultPlan(cfg.faults)
    start = state.restore(actors, stream, inputs.resume_dir, inputs.resume_state) if inputs.resume_dir else 0
    resumed = start if inputs.resume_dir else None
    metrics = MetricsLogger(out, total_steps=cfg.steps, start_step=start, tensorboard=cfg.logging.tensorboard,
                            progress_bar=cfg.logging.progress_bar, resume_from_step=resumed)
    samples = RolloutLogger(out, resume_from_step=start) if cfg.logging.rollouts else None
    try:
        for step in range(start + 1, cfg.steps + 1):
            timer = PhaseTimer()
            shards = make_shards(stream.next_batch(cfg.rollout.prompts_per_step), cfg.generators.shard_prompts)
            with timer("generate"):
                batches, events = actors.pool.generate(shards, SamplingSpec.for_step(cfg.rollout, cfg.seed, step),
                                                       kill_after_dispatch=faults.generators_to_kill(step))
            faults.before_reward(step, actors.reward)
            with timer("reward"):
                scored, summary = actors.reward.score.options(num_returns=2).remote(*batches)
                summary = ray.get(summary)
            with timer("learn"):
                stats = actors.learners.step(scored)
            with timer("sync"):
                synced = actors.publish(stats.version)
            with timer("log"):
                metrics.log(step, step_metrics(summary, stats, synced, events, timer, len(actors.pool)))
                if samples:
                    samples.write(step, ray.get(scored))
            if step == cfg.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                state.save(cfg, actors, stream, step)
            if faults.stop_after(step, cfg.steps):
                break
            if on_step_end:
                on_step_end(step, actors)
            actors.maybe_grow(cfg.pool_max)
        if on_finish:
            on_finish(actors)
    finally:
        metrics.close()
        actors.shutdown()
    print(f"metrics: {out / 'metrics.jsonl'}  tensorboard: {out / 'tensorboard'}  rollouts: {out / 'rollouts'}")
    return out


def step_metrics(summary: RolloutSummary, stats: LearnerStats, synced: SyncResult, events: PoolEvents,
                 timer: PhaseTimer, pool_size: int) -> dict[str, float]:
    """One flat row of the metrics JSONL (every key is documented in docs/metrics.md)."""
    step_s = time.perf_counter() - timer.t0
    row = {"policy_version": stats.version}
    row.update(rollout_stats(summary, learner_version=stats.version - 1))
    row.update({f"ppo/{k}": v for k, v in stats.to_dict().items()})
    row.update({f"time/{k}": v for k, v in timer.seconds.items()})
    row.update({
        "time/step": step_s,
        "time/orchestration": step_s - sum(timer.seconds.values()),
        "perf/generated_tokens_per_s": summary.response_tokens / max(timer.seconds["generate"], 1e-9),
        "perf/samples_per_s": summary.count / max(step_s, 1e-9),
        "sync/seconds": synced.seconds,
        "sync/bytes": synced.bytes,
        "sync/verify_seconds": synced.verify_seconds,
        "sync/verified": float(bool(synced.checksum)),
        "pool/size": pool_size,
        "pool/deaths": len(events.died),
        "pool/requeued_shards": events.requeued_shards,
    })
    return row
