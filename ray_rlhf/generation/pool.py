"""GeneratorPool: N generator actors fed through a work queue; survives deaths, grows and shrinks.

A step's prompts are cut into :class:`~ray_rlhf.records.PromptShard` s and handed out one shard per
idle actor, so a faster actor takes more shards. When an actor dies mid-shard (node lost,
``ray.kill``, OOM), its shard goes back on the queue for the live actors and a replacement is
started; a member -- new or replacement -- is synced to the current weights (``on_join``) before it
takes any work, because a restarted actor comes back with its initial weights. Each actor lives in
its own single-bundle placement group, so the pool grows when the cluster gains room
(:meth:`GeneratorPool.grow`) and shrinks when a node leaves, within ``[min_size, max_size]``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec

log = logging.getLogger(__name__)

ACTOR_DEAD_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)
"""What a call on a generator raises when the actor is gone (killed, crashed, node lost)."""


class PoolError(UserError):
    """The pool cannot go on (fewer live generators than its minimum, restarts exhausted): the
    cluster lacks room the run asks for, a one-line error naming the settings to change."""


def make_shards(prompts: list[PromptItem], shard_prompts: int) -> list[PromptShard]:
    """Cut a step's prompts into shards of at most ``shard_prompts`` prompts, in order."""
    return [
        PromptShard(shard_id=i, prompts=tuple(prompts[s : s + shard_prompts]))
        for i, s in enumerate(range(0, len(prompts), shard_prompts))
    ]


@dataclass
class Member:
    generator_id: str
    handle: Any
    pg: Any
    bundle_index: int = 0


class OwnGroups:
    """Default placement (``placement=split``): each member in its own single-bundle placement group,
    so the pool grows wherever the cluster gains room."""

    def __init__(self, bundle: dict[str, float]):
        self.bundle = bundle

    def take(self, n: int, timeout_s: float) -> list[tuple[Any, int]]:
        """Up to ``n`` (placement group, bundle index) slots that became ready within ``timeout_s``."""
        pgs = [placement_group([dict(self.bundle)], strategy="PACK") for _ in range(n)]
        ready_refs = [pg.ready() for pg in pgs]
        ready, _ = ray.wait(ready_refs, num_returns=len(ready_refs), timeout=timeout_s) if ready_refs else ([], [])
        slots = []
        for pg, ref in zip(pgs, ready_refs):
            if ref in ready:
                slots.append((pg, 0))
            else:
                remove_placement_group(pg)  # no room: give the capacity request back
        return slots

    def give_back(self, pg: Any, bundle_index: int) -> None:
        remove_placement_group(pg)


class SharedSlots:
    """Placement at the bundles of one placement group the pool does not own (``placement=colocated``:
    bundle ``i`` also holds learner rank ``i``). A replacement takes the bundle its predecessor left;
    the pool never grows beyond the bundles."""

    def __init__(self, pg: Any, size: int):
        self.pg, self.free = pg, list(range(size))

    def take(self, n: int, timeout_s: float) -> list[tuple[Any, int]]:
        if not self.free or not ray.wait([self.pg.ready()], timeout=timeout_s)[0]:
            return []
        taken, self.free = self.free[:n], self.free[n:]
        return [(self.pg, i) for i in taken]

    def give_back(self, pg: Any, bundle_index: int) -> None:
        self.free = sorted({*self.free, bundle_index})


@dataclass
class PoolEvents:
    """What happened to the pool during one call (for metrics and tests)."""

    died: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    requeued_shards: int = 0
    hung: list[str] = field(default_factory=list)
    """Members replaced because a shard ran past its deadline."""
    shards_per_member: dict[str, int] = field(default_factory=dict)
    generate_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each member spent inside its engine on this call's shards."""
    env: dict[str, float] = field(default_factory=dict)
    """Multi-turn runs: the environment counts of this call's shards, summed
    (:class:`~ray_rlhf.generation.trajectory.EnvStats` fields); empty for single-turn runs."""


class GeneratorPool:
    """Elastic set of generator actors behind a shard work queue.

    ``actor_cls`` is the ``ray.remote``-wrapped Generator class; ``actor_kwargs(generator_id)``
    gives its constructor arguments; ``bundle`` is the resources of one actor (e.g.
    ``{"CPU": 0.5}`` or ``{"GPU": 1}``); ``on_join({id: handle})`` brings new actors to the
    current weight version before they take work (the weight broadcaster's ``join``).

    A dead member is noticed where the pool next talks to it: a failed ``generate`` call (its shard
    is re-queued) or a weight sync that found it silent (:meth:`remove_lost`). It is then dropped and replaced
    (at most ``max_restarts`` replacements in a run). A replacement waits ``placement_timeout_s``
    for room when the pool is below ``min_size``, only ``replace_timeout_s`` otherwise: when a node
    has left, the pool carries on smaller and :meth:`grow` refills it once the cluster has room.
    Below ``min_size`` live members with no room for a replacement, the pool raises
    :class:`PoolError`.
    """

    def __init__(
        self,
        actor_cls: Any,
        actor_kwargs: Callable[[str], dict],
        bundle: dict[str, float],
        size: int,
        min_size: int,
        max_size: int,
        on_join: Callable[[dict[str, Any]], None],
        max_restarts: int = 3,
        placement_timeout_s: float = 60.0,
        replace_timeout_s: float = 5.0,
        shard_timeout_s: float | None = None,
        shard_timeout_floor_s: float = 60.0,
        slots: SharedSlots | None = None,
        turns_per_sample: int = 1,
        env_timeout_s: float = 0.0,
    ):
        self.actor_cls, self.actor_kwargs, self.bundle = actor_cls, actor_kwargs, bundle
        self.placer: OwnGroups | SharedSlots = slots if slots is not None else OwnGroups(bundle)
        """Where members go: their own placement groups, or the bundles of a shared one (``slots``)."""
        self.min_size, self.max_size, self.on_join = min_size, max_size, on_join
        self.max_restarts, self.placement_timeout_s = max_restarts, placement_timeout_s
        self.replace_timeout_s = replace_timeout_s
        self.shard_timeout_s, self.shard_timeout_floor_s = shard_timeout_s, shard_timeout_floor_s
        self.turns_per_sample, self.env_timeout_s = int(turns_per_sample), float(env_timeout_s)
        """Multi-turn runs: ``env.max_turns`` and ``env.step_timeout_s`` (a shard's automatic deadline
        covers every turn's tokens and every environment call's time-out); 1 and 0 otherwise."""
        self.seconds_per_token: float | None = None
        """Engine seconds per generated token of the last completed shard (sets the deadlines)."""
        self.restarts = 0
        """Replacements started for dead members so far (bounded by ``max_restarts``)."""
        self.members: dict[str, Member] = {}
        self._ids = itertools.count()
        self.events = PoolEvents()
        """Deaths, starts and re-queues since the last :meth:`generate` began (one step's worth)."""
        self.on_queue: Callable[[int], None] = lambda queued: None
        """Called with the number of shards waiting for a free generator, as it changes."""
        started = self._start(size, timeout_s=placement_timeout_s)
        if len(started) < min_size:
            raise PoolError(
                f"only {len(started)} of generators.min={min_size} generator actors could be placed "
                f"(each needs {bundle}); lower generators.num/min or add capacity"
            )

    # ---- membership ----------------------------------------------------------------------------
    @property
    def handles(self) -> dict[str, Any]:
        """Live members: generator id -> actor handle, in joining order. (``list`` copies the items
        in one step: ``rollout.partial`` reads this from the driver thread while the producer
        thread may replace a member.)"""
        return {gid: m.handle for gid, m in list(self.members.items())}

    def __len__(self) -> int:
        return len(self.members)

    def _start(self, n: int, timeout_s: float) -> list[str]:
        """Place and start up to ``n`` actors and sync them (``on_join``); returns the ids that joined."""
        started: list[Member] = []
        for pg, index in self.placer.take(n, timeout_s):
            gid = f"gen-{next(self._ids)}"
            handle = self.actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
                name=None,
            ).remote(**self.actor_kwargs(gid))
            started.append(Member(gid, handle, pg, index))
        alive = self._answering(started, timeout_s=None)  # waits for each engine to come up
        while alive:
            try:
                self.on_join({m.generator_id: m.handle for m in alive})  # current weights before any work
                break
            except ACTOR_DEAD_ERRORS:  # one died while syncing: sync the others again
                alive = self._answering(alive, timeout_s=60)
        for m in alive:
            self.members[m.generator_id] = m
        if alive:
            self.events.started += [m.generator_id for m in alive]
        return [m.generator_id for m in alive]

    def _answering(self, members: list[Member], timeout_s: float | None) -> list[Member]:
        """The members that answer a ping; the others are killed and their placement freed."""
        refs = [m.handle.ping.remote() for m in members]
        alive = []
        for m, ref in zip(members, refs):
            try:
                ray.get(ref, timeout=timeout_s)
                alive.append(m)
            except (*ACTOR_DEAD_ERRORS, GetTimeoutError) as e:
                log.warning("generator %s does not answer (%s): dropping it", m.generator_id, type(e).__name__)
                self._release(m)
        return alive

    def _release(self, m: Member) -> None:
        for free in (lambda: ray.kill(m.handle, no_restart=True), lambda: self.placer.give_back(m.pg, m.bundle_index)):
            try:
                free()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _drop(self, gid: str) -> None:
        m = self.members.pop(gid, None)
        if m is not None:
            self._release(m)

    def _died(self, gid: str) -> None:
        """Record and drop a member found dead."""
        if gid in self.members:
            self.events.died.append(gid)
            self._drop(gid)

    def replace(self, n: int) -> list[str]:
        """Start up to ``n`` replacements for dead members (within ``max_restarts`` and
        ``max_size``); raises :class:`PoolError` if the pool is then below ``min_size``."""
        n = min(n, self.max_restarts - self.restarts, self.max_size - len(self))
        new: list[str] = []
        if n > 0:
            below_min = len(self) < self.min_size
            new = self._start(n, timeout_s=self.placement_timeout_s if below_min else self.replace_timeout_s)
            self.restarts += len(new)
            if len(new) < n:
                log.warning("no room for %d replacement generator(s): the pool carries on with %d",
                            n - len(new), len(self))
        if len(self) < self.min_size:
            raise PoolError(
                f"{len(self)} live generators, below generators.min={self.min_size}, after "
                f"{self.restarts} of generators.max_restarts={self.max_restarts} replacements (each needs "
                f"{self.bundle}); add capacity, lower generators.min or raise generators.max_restarts"
            )
        return new

    def grow(self, timeout_s: float = 2.0) -> list[str]:
        """Add actors up to ``max_size`` where the cluster has room now (elastic growth)."""
        want = self.max_size - len(self)
        return self._start(want, timeout_s=timeout_s) if want > 0 else []

    def kill(self, index: int) -> str:
        """Fault injection (``faults.kill_generator``, or a test's hook between steps): ``ray.kill``
        the member at position ``index`` (kept in the pool, so the pool finds out the way it would
        in production: a failed call)."""
        gid = list(self.members)[index % len(self.members)]
        ray.kill(self.members[gid].handle, no_restart=True)
        return gid

    def remove_lost(self, lost: list[str] | tuple[str, ...]) -> list[str]:
        """Drop members found dead elsewhere (e.g. during a weight sync) and start replacements."""
        for gid in lost:
            self._died(gid)
        return self.replace(len(lost)) if lost else []

    # ---- colocated phases (placement=colocated) ------------------------------------------------
    def sleep(self) -> dict[str, dict]:
        """Every engine sleeps (:meth:`Generator.sleep`): generator id -> its report. A member found
        dead is dropped (replaced at the next :meth:`wake_up`, awake, so not while the learner trains)."""
        return self._gather({gid: m.handle.sleep.remote() for gid, m in self.members.items()})

    def wake_up(self) -> dict[str, dict]:
        """Every engine wakes (:meth:`Generator.wake_up`); members lost since are replaced now."""
        reports = self._gather({gid: m.handle.wake_up.remote() for gid, m in self.members.items()})
        if len(self) < self.max_size:
            self.replace(self.max_size - len(self))
        return reports

    def placements(self) -> dict[str, dict]:
        """Generator id -> where it runs (:meth:`Generator.placement`) and ``bundle_index``, the
        bundle of its placement group it was scheduled at."""
        out = self._gather({gid: m.handle.placement.remote() for gid, m in self.members.items()})
        return {gid: {**where, "bundle_index": self.members[gid].bundle_index} for gid, where in out.items()}

    def _gather(self, refs: dict[str, Any]) -> dict[str, dict]:
        out = {}
        for gid, ref in refs.items():
            try:
                out[gid] = ray.get(ref)
            except ACTOR_DEAD_ERRORS:
                log.warning("generator %s died between phases: dropping it", gid)
                self._died(gid)
        return out

    # ---- work ----------------------------------------------------------------------------------
    def generate(self, shards: list[PromptShard], sampling: SamplingSpec) -> tuple[list[Any], PoolEvents]:
        """Run every shard on some live member; exactly one result per (prompt, sample).

        Returns one ObjectRef of a :class:`~ray_rlhf.records.RolloutBatch` per shard, in shard
        order (the batches stay in the object store; the reward actor takes the refs), and the
        step's :class:`PoolEvents`. Each shard is in flight on at most one member at a time and
        its result is kept only when the call returned; a shard whose member died -- or did not
        finish within its deadline (:meth:`shard_deadline_s`: a hung engine) -- is re-queued at the
        front and the member is replaced. A generator's own error (not a death) is raised as it is.
        """
        events = self.events = PoolEvents()
        queue: deque[PromptShard] = deque(shards)
        idle: deque[str] = deque(self.members)
        inflight: dict[Any, tuple[str, PromptShard, Any, float]] = {}
        done: dict[int, Any] = {}
        while queue or inflight:
            while queue and idle:
                gid = idle.popleft()
                if gid in self.members:
                    shard = queue.popleft()
                    report, batch = self.members[gid].handle.generate.options(num_returns=2).remote(shard, sampling)
                    deadline = time.monotonic() + self.shard_deadline_s(shard, sampling)
                    inflight[report] = (gid, shard, batch, deadline)
            if not inflight:  # work left and nobody to do it
                self.replace(0)  # raises PoolError below min_size
                raise PoolError(f"no live generator for {len(queue)} shards")
            self.on_queue(len(queue))
            first_deadline = min(d for *_, d in inflight.values())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.0, first_deadline - time.monotonic()))
            if not ready:  # a shard ran past its deadline: its generator hangs
                for ref in [r for r, (*_, d) in inflight.items() if d <= time.monotonic()]:
                    gid, shard, _, _ = inflight.pop(ref)
                    log.warning("generator %s did not finish shard %d within %.0f s: re-queueing the shard and "
                                "replacing the generator", gid, shard.shard_id, self.shard_deadline_s(shard, sampling))
                    events.requeued_shards += 1
                    events.hung.append(gid)
                    queue.appendleft(shard)
                    self._died(gid)
                    idle.extend(self.replace(1))
                continue
            gid, shard, batch, _ = inflight.pop(ready[0])
            try:
                report = ray.get(ready[0])
            except ACTOR_DEAD_ERRORS:
                log.warning("generator %s died; re-queueing shard %d", gid, shard.shard_id)
                events.requeued_shards += 1
                queue.appendleft(shard)
                self._died(gid)
                idle.extend(self.replace(1))
                continue
            if shard.shard_id in done:  # cannot happen with one dispatch per shard; guard anyway
                raise PoolError(f"shard {shard.shard_id} completed twice")
            done[shard.shard_id] = batch
            if report.tokens:
                self.seconds_per_token = report.seconds / report.tokens  # the latest measurement
            events.shards_per_member[gid] = events.shards_per_member.get(gid, 0) + 1
            events.generate_seconds[gid] = events.generate_seconds.get(gid, 0.0) + report.seconds
            for k, v in (getattr(report, "env", None) or {}).items():
                events.env[k] = events.env.get(k, 0) + v
            idle.append(gid)
        self.on_queue(0)
        return [done[sid] for sid in sorted(done)], events

    def shard_deadline_s(self, shard: PromptShard, sampling: SamplingSpec) -> float:
        """How long a shard may run before its generator counts as hung: ``shard_timeout_s`` if
        set, else 4x the time its token budget takes at the last measured seconds per token, at
        least ``shard_timeout_floor_s`` (and that floor alone until a shard has been measured).
        Multi-turn: the budget is every turn's (``turns_per_sample``), plus each environment
        call's time-out (the reset and every turn's step, the calls of one turn running together)."""
        if self.shard_timeout_s:
            return self.shard_timeout_s
        budget = len(shard.prompts) * sampling.n * sampling.max_new_tokens * self.turns_per_sample
        env_s = (self.turns_per_sample + 1) * self.env_timeout_s
        if self.seconds_per_token is None:
            return self.shard_timeout_floor_s + env_s
        return max(self.shard_timeout_floor_s, 4 * self.seconds_per_token * budget) + env_s

    def shutdown(self) -> None:
        for gid in list(self.members):
            self._drop(gid)


def request_capacity(bundle: dict[str, float], max_size: int) -> bool:
    """Ask the autoscaler for room for ``max_size`` generators (``request_resources``: a standing
    request, replaced by the next call). Returns whether the request was placed; a Ray without an
    autoscaler accepts it and ignores it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(bundle) for _ in range(max_size)])
        return True
    except Exception as e:  # noqa: BLE001 - asking for capacity must never stop a run
        log.warning("could not ask the autoscaler for %d x %s: %s", max_size, bundle, e)
        return False
