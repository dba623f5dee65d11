"""Where each step's scored batch comes from: the synchronous loop, or a producer running ahead.

The driver asks :meth:`next` for step ``s``'s batch and calls :meth:`after_update` with each new
policy version. Two implementations, chosen by ``rollout.max_staleness = k``:

- :class:`SyncRollouts` (``k = 0``): generate and score step ``s`` when asked, after the weights
  of version ``s - 1`` were broadcast -- the synchronous loop, exactly.
- :class:`AsyncRollouts` (``k >= 1``): a producer thread generates and scores the next steps
  while the learner trains. Step ``s`` is always sampled by version ``max(0, s - 1 - k)`` -- a
  fixed lag, so the schedule (and with seeded sampling, every sample) does not depend on timing:
  an async run is reproducible, a resumed one equals the uninterrupted one, and the learner (at
  version ``s - 1`` when it trains on step ``s``) is never more than ``k`` versions ahead of a
  sample's sampler. New weights are exported when the learner finishes (``stage``) and loaded
  into the generators between steps, never inside one (a step's shards all run on one version).
  A checkpoint stores the steps already produced (at most ``k``) with it.

  With ``rollout.partial=true`` a step starts with the newest staged version (at least
  ``max(0, s - 1 - k)``), and a version staged while the step is generated is delivered to every
  generator's mailbox at once: the generators take it at their next engine step, interrupting and
  resuming their in-flight requests (:mod:`ray_rlhf.generation.partial`). Each token keeps the
  version that sampled it, every one at least the step's start version, so the per-token
  staleness stays within ``k``; where the interruptions fall depends on timing (not reproducible
  sample for sample). A checkpoint waits for the steps it stores (``pending``) to finish
  generating; a later step in flight is regenerated after a resume.

Both make a step with :func:`produce`; with ``rollout.dynamic_sampling`` that is several rounds of
generate + score (:mod:`ray_rlhf.run.sampling`), all sampled by the step's one weight version.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.generation.pool import PoolEvents, make_shards
from ray_rlhf.records import RolloutSummary, SamplingSpec
from ray_rlhf.run.actors import RunActors
from ray_rlhf.run.sampling import keep_informative, round_sampling
from ray_rlhf.sync.types import SyncResult

log = logging.getLogger(__name__)


@dataclass
class StepRollouts:
    """One step's scored batch (by reference) and how it was made."""

    step: int
    scored: Any
    """ObjectRef of the scored :class:`~ray_rlhf.records.RolloutBatch`."""
    summary: RolloutSummary
    events: PoolEvents
    cursor: dict
    """The prompt stream's cursor right after this step's prompts were drawn."""
    seconds: dict[str, float] = field(default_factory=dict)
    """``generate``, ``reward`` (and ``weights_load`` in async runs): time spent making it."""
    synced: SyncResult | None = None
    """Async runs: the load of the weights this step was sampled with."""
    sampling_rounds: int | None = None
    """``rollout.dynamic_sampling``: generation rounds this step took (None: off)."""
    discarded_groups: int = 0
    """``rollout.dynamic_sampling``: zero-variance prompt groups left out over the step's rounds."""


class SyncRollouts:
    """``rollout.max_staleness = 0``: generate, then score, when asked."""

    def __init__(self, cfg: RunConfig, actors: RunActors, stream: PromptStream):
        self.cfg, self.actors, self.stream = cfg, actors, stream

    def next(self, step: int) -> StepRollouts:
        return produce(self.cfg, self.actors, self.stream, step)

    def after_update(self, version: int) -> SyncResult:
        """Broadcast the new weights to every generator now (the next step samples with them)."""
        return self.actors.publish(version)

    def pending(self, after_step: int) -> list[StepRollouts]:
        return []

    def grow(self) -> None:
        """Between steps, the pool may grow where the cluster has room."""
        self.actors.maybe_grow(self.cfg.pool_max)

    def close(self) -> None:
        pass


def produce(cfg: RunConfig, actors: RunActors, stream: PromptStream, step: int) -> StepRollouts:
    """Generate and score step ``step``: its prompts, sharded over the pool; the scores. With
    ``rollout.dynamic_sampling``, more rounds until enough groups are informative (:mod:`.sampling`)."""
    if cfg.rollout.dynamic_sampling:
        return produce_informative(cfg, actors, stream, step)
    t0 = time.perf_counter()
    scored, summary, events = _generate_and_score(cfg, actors, stream, step, 0)
    t1 = time.perf_counter()
    summary = ray.get(summary)
    return StepRollouts(step, scored, summary, events, stream.state_dict(),
                        seconds={"generate": t1 - t0, "reward": time.perf_counter() - t1})


def _generate_and_score(cfg: RunConfig, actors: RunActors, stream: PromptStream, step: int,
                        rnd: int) -> tuple[Any, Any, PoolEvents]:
    """Round ``rnd`` of step ``step``: the stream's next ``prompts_per_step`` prompts generated
    (returns when the pool is done) and handed to the reward actor (refs of the scored batch and
    its summary)."""
    shards = make_shards(stream.next_batch(cfg.rollout.prompts_per_step), cfg.generators.shard_prompts)
    sampling = round_sampling(SamplingSpec.for_step(cfg.rollout, cfg.seed, step), rnd)
    batches, events = actors.pool.generate(shards, sampling)
    scored, summary = actors.reward.score.options(num_returns=2).remote(*batches)
    return scored, summary, events


_keep_informative = ray.remote(num_cpus=0)(keep_informative)


def produce_informative(cfg: RunConfig, actors: RunActors, stream: PromptStream, step: int) -> StepRollouts:
    """Dynamic sampling: rounds of generate + score until ``prompts_per_step`` groups have
    differing rewards, at most ``max_sampling_rounds``; the step keeps the first ones
    (:func:`~ray_rlhf.run.sampling.keep_informative`, a Ray task on the scored refs)."""
    r, want = cfg.rollout, cfg.rollout.prompts_per_step
    seconds, events, scored = {"generate": 0.0, "reward": 0.0}, PoolEvents(), []
    for rnd in range(r.max_sampling_rounds):
        t0 = time.perf_counter()
        ref, _, round_events = _generate_and_score(cfg, actors, stream, step, rnd)
        t1 = time.perf_counter()
        scored.append(ref)
        kept, result = _keep_informative.options(num_returns=2).remote(want, *scored)
        result = ray.get(result)
        seconds["generate"] += t1 - t0
        seconds["reward"] += time.perf_counter() - t1
        events = _merged(events, round_events)
        if result.informative >= want:
            break
    rounds = rnd + 1
    if result.kept < want:
        log.warning("step %d: %d of %d prompt groups with differing rewards after %d sampling rounds; %s", step,
                    result.informative, want, rounds,
                    f"training on {result.kept}" if result.kept else
                    "none usable: training on the first round's groups as they are (all zero advantages; "
                    "algo.drop_zero_std_groups=true skips such an update)")
    return StepRollouts(step, kept, result.summary, events, stream.state_dict(), seconds=seconds,
                        sampling_rounds=rounds, discarded_groups=result.discarded)


def _merged(a: PoolEvents, b: PoolEvents) -> PoolEvents:
    """The pool events of two generation calls of one step."""
    return PoolEvents(died=a.died + b.died, started=a.started + b.started,
                      requeued_shards=a.requeued_shards + b.requeued_shards, hung=a.hung + b.hung,
                      shards_per_member={k: a.shards_per_member.get(k, 0) + b.shards_per_member.get(k, 0)
                                         for k in {*a.shards_per_member, *b.shards_per_member}},
                      generate_seconds={k: a.generate_seconds.get(k, 0.0) + b.generate_seconds.get(k, 0.0)
                                        for k in {*a.generate_seconds, *b.generate_seconds}},
                      env={k: a.env.get(k, 0) + b.env.get(k, 0) for k in {*a.env, *b.env}})


class AsyncRollouts:
    """``rollout.max_staleness = k >= 1``: a producer thread keeps up to ``k`` steps ready."""

    def __init__(self, cfg: RunConfig, actors: RunActors, stream: PromptStream, start_step: int,
                 ready: list[StepRollouts] = ()):
        self.cfg, self.actors, self.stream = cfg, actors, stream
        self.k = cfg.rollout.max_staleness
        self.partial = cfg.rollout.partial
        self.learner_version = start_step
        self._staged = threading.Condition()
        actors.broadcaster.stage(start_step, keep=self.k + 1)
        self._done: dict[int, StepRollouts] = {r.step: r for r in ready}
        self._out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        first = start_step + 1 + len(self._done)
        self._thread = threading.Thread(target=self._run, args=(first,), name="rollout-producer", daemon=True)
        self._thread.start()

    def sampler_version(self, step: int) -> int:
        """The version that samples step ``step``: a fixed lag of ``k``."""
        return max(0, step - 1 - self.k)

    def _run(self, first: int) -> None:
        try:
            for step in range(first, self.cfg.steps + 1):
                version = self.sampler_version(step)
                t0 = time.perf_counter()
                with self._staged:  # the learner must have produced (and staged) that version
                    while self.learner_version < version and not self._stop.is_set():
                        self._staged.wait(timeout=1.0)
                waited = time.perf_counter() - t0
                if self._stop.is_set():
                    return
                synced = None
                if self.partial:  # the newest staged version (mailbox loads may already hold it)
                    with self._staged:
                        version = max(version, self.learner_version)
                held = self.partial and self.actors.broadcaster.held(version, self.actors.pool.handles)
                if self.actors.broadcaster.version != version and not held:
                    t0 = time.perf_counter()
                    synced = self.actors.broadcaster.publish_staged(version, self.actors.pool.handles)
                    if synced.lost:
                        self.actors.pool.remove_lost(synced.lost)
                    load_s = time.perf_counter() - t0
                else:  # the generators already hold it (verified when they loaded it)
                    synced, load_s = self.actors.broadcaster.last, 0.0
                item = produce(self.cfg, self.actors, self.stream, step)
                item.synced, item.seconds["weights_load"] = synced, load_s
                item.seconds["generator_wait"] = waited
                self._out.put(item)
                self.actors.maybe_grow(self.cfg.pool_max)  # between steps: the pool is idle
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            self._error = e
            self._out.put(None)

    def next(self, step: int) -> StepRollouts:
        t0 = time.perf_counter()
        while step not in self._done:
            item = self._out.get()
            if item is None:
                raise self._error
            self._done[item.step] = item
        item = self._done.pop(step)
        item.seconds["learner_wait"] = time.perf_counter() - t0
        return item

    def after_update(self, version: int) -> SyncResult:
        """Export the new weights (the producer loads them when their step comes)."""
        seconds = self.actors.broadcaster.stage(version, keep=self.k + 1)
        if self.partial:  # the generators take it at their next engine step, mid-step if one is running
            self.actors.broadcaster.deliver_staged(version, self.actors.pool.handles)
        with self._staged:
            self.learner_version = version
            self._staged.notify_all()
        return SyncResult(version, "staged", 0, seconds, len(self.actors.pool))

    def pending(self, after_step: int) -> list[StepRollouts]:
        """The steps after ``after_step`` produced so far: waits for the ones the producer is due
        to make before the learner needs them (up to ``k``), so a checkpoint can hold them."""
        wanted = range(after_step + 1, min(after_step + self.k, self.cfg.steps) + 1)
        for step in wanted:
            while step not in self._done:
                item = self._out.get()
                if item is None:
                    raise self._error
                self._done[item.step] = item
        return [self._done[s] for s in wanted]

    def grow(self) -> None:
        pass  # the producer grows the pool between its steps

    def close(self) -> None:
        self._stop.set()
        with self._staged:
            self._staged.notify_all()
        self._thread.join(timeout=5)  # a step in flight ends when the actors are shut down
