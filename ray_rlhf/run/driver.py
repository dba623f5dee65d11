"""The PPO driver: one cycle per step, one line per phase, each phase timed.

    prompts -> generate (GeneratorPool: vLLM, one RolloutBatch ref per shard)
            -> score    (reward actor: the refs in, a scored batch ref + a small summary out)
            -> learn    (LearnerGroup: the scored batch by ref; old/ref logprobs, values, GAE, PPO)
            -> sync     (WeightBroadcaster: version v+1 into every engine, checksum-verified)
            -> log, checkpoint

With ``placement=colocated`` (:mod:`ray_rlhf.run.placement`) each GPU holds a generator and a learner
rank, and two phases frame the update: ``sleep`` (the engines sleep, the learner's AdamW state comes
back) after the rollout, ``wake`` (the state goes to CPU memory, the engines wake) before the sync.

Token arrays travel between actors as ObjectRefs; the driver fetches the summary it logs (and the
scored batch only when rollouts are logged). Started by ``python -m ray_rlhf.train`` or
``ray-rlhf train``; it joins ``RAY_ADDRESS`` (or ``ray.address``) when set, as under
``ray job submit``, and starts a local Ray otherwise. Re-running the same command resumes from the
newest complete checkpoint (``checkpoint.resume=auto``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import ray

from ray_rlhf.config import RunConfig, to_yaml
from ray_rlhf.console import setup_driver_logging
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.learning.group import LearnerError
from ray_rlhf.learning.stats import LearnerStats
from ray_rlhf.metrics import RolloutLogger
from ray_rlhf.run import state
from ray_rlhf.run.actors import RunActors
from ray_rlhf.run.cluster import init_ray
from ray_rlhf.run.faults import FaultPlan
from ray_rlhf.run.inputs import load_inputs
from ray_rlhf.run.observe import PhaseTimer, live_step, open_metrics, queue_gauge, step_metrics
from ray_rlhf.run.preemption import Preempted, StopSignals
from ray_rlhf.run.recovery import recover_learners
from ray_rlhf.run.rollouts import AsyncRollouts, StepRollouts, SyncRollouts
from ray_rlhf.sync.types import SyncResult

log = logging.getLogger("ray_rlhf")


def run(cfg: RunConfig, on_finish: Callable[[RunActors], None] | None = None,
        on_step_end: Callable[[int, RunActors], None] | None = None) -> Path:
    """Run (or resume) a training; returns the output directory.

    ``on_finish(actors)`` is called with the live actors after the last step, before they are
    shut down (the benchmarks read each actor's memory there); ``on_step_end(step, actors)`` after
    each step is logged and checkpointed, before the pool tries to grow (tests change the cluster
    there). Raises :class:`~ray_rlhf.run.preemption.Preempted` after a SIGTERM/SIGINT (checkpoint
    written).
    """
    setup_driver_logging()
    out = Path(cfg.output_dir)
    inputs = load_inputs(cfg)  # load and check everything the user gave, before Ray
    log.info("resolved config:\n%s", to_yaml(cfg))
    (out / "config.yaml").write_text(to_yaml(cfg))

    init_ray(cfg)
    faults = FaultPlan(cfg)  # the pool and the learner group inject theirs; stop is the loop's
    actors = RunActors.start(cfg, inputs.policy_path, columns=list(inputs.prompts[0].columns), faults=faults)
    stream = PromptStream(inputs.prompts, seed=cfg.seed)
    start, ready = (state.restore(actors, stream, inputs.store_uri, inputs.resume, inputs.resume_state)
                    if inputs.resume else (0, []))
    loop = Loop(cfg, actors, stream, start, ready, resumed=start if inputs.resume else None)
    if actors.colocation:  # placement=colocated: record which actor landed on which bundle / GPU
        actors.colocation.placed(actors.pool, actors.learners)
    restarts, step = 0, start + 1
    with StopSignals() as signals:  # also over the shutdown: a second signal exits at once
        try:
            while step <= cfg.steps:
                timer = PhaseTimer()
                if actors.colocation:  # placement=colocated: engines awake, learner state offloaded
                    actors.colocation.generating(step, actors.pool, actors.learners)  # (no-op but at start/recovery)
                with timer("rollout"):
                    batch = loop.rollouts.next(step)  # generate + score (async: made while the learner trained)
                if actors.colocation:
                    with timer("sleep"):  # the engines sleep while the learner trains on their GPUs
                        actors.colocation.training(step, actors.pool, actors.learners)
                try:
                    with timer("learn"):
                        stats = actors.learners.step(batch.scored)
                except LearnerError as e:  # restart the learners from the newest checkpoint, replay from there
                    restarts += 1
                    if restarts > cfg.learner.max_restarts:
                        raise
                    start, ready = recover_learners(cfg, actors, stream, inputs.policy_path, e)
                    loop.reopen(start, ready)
                    step = start + 1
                    continue
                if actors.colocation:
                    with timer("wake"):  # awake before the sync loads the new weights into them
                        actors.colocation.generating(step, actors.pool, actors.learners)
                with timer("sync"):
                    synced = loop.rollouts.after_update(stats.version)  # async: exported now, loaded later
                with timer("log"):
                    loop.log(step, batch, stats, synced, timer)
                stop = faults.stop_after(step, cfg.steps) or signals.requested
                if step == cfg.steps or stop or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    pending = loop.rollouts.pending(step)
                    path = state.save(cfg, actors, pending[-1].cursor if pending else stream.state_dict(), step,
                                      pending)
                if signals.requested and step < cfg.steps:
                    raise Preempted(signals.requested, step, str(path))
                if stop:
                    break
                if on_step_end:
                    on_step_end(step, actors)
                loop.rollouts.grow()
                step += 1
            if on_finish:
                on_finish(actors)
        finally:
            loop.close()
            actors.shutdown()
    print(f"metrics: {out / 'metrics.jsonl'}  tensorboard: {out / 'tensorboard'}  rollouts: {out / 'rollouts'}")
    return out


class Loop:
    """What the step loop writes to and reads from: the rollout source and the loggers, reopened
    at the restored step after a learner recovery."""

    def __init__(self, cfg: RunConfig, actors: RunActors, stream: PromptStream, start: int, ready: list,
                 resumed: int | None):
        self.cfg, self.actors, self.stream = cfg, actors, stream
        self.rollouts = self.metrics = self.samples = None
        self._open(start, ready, resumed)

    def _open(self, start: int, ready: list, resumed: int | None) -> None:
        cfg = self.cfg
        self.rollouts = (AsyncRollouts(cfg, self.actors, self.stream, start, ready)
                         if cfg.rollout.max_staleness else SyncRollouts(cfg, self.actors, self.stream))
        self.metrics = open_metrics(cfg, start, resumed)
        self.actors.pool.on_queue = queue_gauge(self.metrics)
        self.samples = RolloutLogger(cfg.output_dir, resume_from_step=start) if cfg.logging.rollouts else None

    def reopen(self, start: int, ready: list) -> None:
        """After a recovery: the steps after ``start`` are written again."""
        self.close()
        self._open(start, ready, resumed=start)

    def log(self, step: int, batch: StepRollouts, stats: LearnerStats, synced: SyncResult, timer: PhaseTimer) -> None:
        row = step_metrics(batch, stats, synced, timer, len(self.actors.pool))
        self.metrics.log(step, row, histograms={"rollout/staleness": stats.version - 1 - batch.summary.versions})
        live_step(self.metrics, row)
        if self.samples:
            self.samples.write(step, ray.get(batch.scored))

    def close(self) -> None:
        self.rollouts.close()
        self.metrics.close()
