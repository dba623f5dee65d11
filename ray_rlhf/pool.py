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
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem, PromptShard, Rollout, SamplingSpec

log = logging.getLogger(__name__)

_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class PoolError(RuntimeError):
    """The pool cannot go on (fewer live generators than its minimum, restarts exhausted)."""


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
    shards_done: int = 0


@dataclass
class PoolEvents:
    """What happened to the pool during one call (for metrics and tests)."""

    died: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    requeued_shards: int = 0
    shards_per_member: dict[str, int] = field(default_factory=dict)


class GeneratorPool:
    """Elastic set of generator actors behind a shard work queue.

    ``actor_cls`` is the ``ray.remote``-wrapped Generator class; ``actor_kwargs(generator_id)``
    gives its constructor arguments; ``bundle`` is the resources of one actor (e.g.
    ``{"CPU": 0.5}`` or ``{"GPU": 1}``); ``on_join(handles)`` brings new actors to the current
    weight version before they take work.
    """

    def __init__(
        self,
        actor_cls: Any,
        actor_kwargs: Callable[[str], dict],
        bundle: dict[str, float],
        size: int,
        min_size: int,
        max_size: int,
        on_join: Callable[[list[Any]], None],
        max_restarts: int = 3,
        placement_timeout_s: float = 60.0,
    ):
        self.actor_cls, self.actor_kwargs, self.bundle = actor_cls, actor_kwargs, bundle
        self.min_size, self.max_size, self.on_join = min_size, max_size, on_join
        self.max_restarts, self.placement_timeout_s = max_restarts, placement_timeout_s
        self.restarts = 0
        self.members: dict[str, Member] = {}
        self._ids = itertools.count()
        self.membership_version = 0
        """Bumped whenever a member joins or leaves (the collective backend rebuilds its group)."""
        started = self._start(size, timeout_s=placement_timeout_s)
        if len(started) < min_size:
            raise PoolError(
                f"only {len(started)} of generators.min={min_size} generator actors could be placed "
                f"(each needs {bundle}); lower generators.num/min or add capacity"
            )

    # ---- membership ----------------------------------------------------------------------------
    @property
    def handles(self) -> list[Any]:
        return [m.handle for m in self.members.values()]

    def __len__(self) -> int:
        return len(self.members)

    def _start(self, n: int, timeout_s: float) -> list[str]:
        """Place and start up to ``n`` actors; returns the ids that came up (not yet synced)."""
        pgs = [placement_group([dict(self.bundle)], strategy="PACK") for _ in range(n)]
        ready_refs = [pg.ready() for pg in pgs]
        ready, _ = ray.wait(ready_refs, num_returns=len(ready_refs), timeout=timeout_s) if ready_refs else ([], [])
        started: list[Member] = []
        for pg, ref in zip(pgs, ready_refs):
            if ref not in ready:
                remove_placement_group(pg)  # no room: give the capacity request back
                continue
            gid = f"gen-{next(self._ids)}"
            handle = self.actor_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
                name=None,
            ).remote(**self.actor_kwargs(gid))
            started.append(Member(gid, handle, pg))
        alive: list[Member] = []
        for m in started:  # wait for each engine to come up
            try:
                ray.get(m.handle.ping.remote())
                alive.append(m)
            except _DEAD as e:
                log.warning("generator %s failed to start: %s", m.generator_id, e)
                remove_placement_group(m.pg)
        if alive:
            self.on_join([m.handle for m in alive])
            for m in alive:
                self.members[m.generator_id] = m
            self.membership_version += 1
        return [m.generator_id for m in alive]

    def _drop(self, gid: str) -> None:
        m = self.members.pop(gid, None)
        if m is None:
            return
        try:
            ray.kill(m.handle, no_restart=True)
        except Exception:  # already gone
            pass
        try:
            remove_placement_group(m.pg)
        except Exception:
            pass
        self.membership_version += 1

    def _replace(self, events: PoolEvents) -> list[str]:
        """Start a replacement for a dead member if restarts remain; shrink otherwise."""
        if self.restarts >= self.max_restarts or len(self) >= self.max_size:
            return []
        self.restarts += 1
        new = self._start(1, timeout_s=self.placement_timeout_s)
        events.started += new
        return new

    def grow(self, timeout_s: float = 2.0) -> list[str]:
        """Add actors up to ``max_size`` where the cluster has room now (elastic growth)."""
        want = self.max_size - len(self)
        return self._start(want, timeout_s=timeout_s) if want > 0 else []

    def check_alive(self) -> list[str]:
        """Drop members that no longer answer (e.g. their node left); returns their ids."""
        dead = []
        refs = {m.handle.ping.remote(): gid for gid, m in self.members.items()}
        for ref, gid in refs.items():
            try:
                ray.get(ref, timeout=60)
            except _DEAD:
                dead.append(gid)
        for gid in dead:
            self._drop(gid)
        return dead

    def kill(self, index: int) -> str:
        """Fault injection: ``ray.kill`` the member at position ``index`` (kept in the pool, so the
        pool finds out the way it would in production: a failed call)."""
        gid = list(self.members)[index % len(self.members)]
        ray.kill(self.members[gid].handle, no_restart=True)
        return gid

    # ---- work ----------------------------------------------------------------------------------
    def generate(
        self, shards: list[PromptShard], sampling: SamplingSpec, kill_after_dispatch: list[int] = ()
    ) -> tuple[list[Rollout], PoolEvents]:
        """Run every shard on some live member; exactly one result per (prompt, sample)."""
        events = PoolEvents()
        queue: deque[PromptShard] = deque(shards)
        idle: deque[str] = deque(self.members)
        inflight: dict[Any, tuple[str, PromptShard]] = {}
        done: dict[int, list[Rollout]] = {}
        killed = False
        while queue or inflight:
            while queue and idle:
                gid = idle.popleft()
                if gid not in self.members:
                    continue
                shard = queue.popleft()
                inflight[self.members[gid].handle.generate.remote(shard, sampling)] = (gid, shard)
            if kill_after_dispatch and not killed:
                killed = True
                for index in kill_after_dispatch:
                    log.warning("fault injection: killing generator %s", self.kill(index))
            if not inflight:
                if len(self) < self.min_size or not self.members:
                    raise PoolError(
                        f"{len(self)} live generators, below generators.min={self.min_size}, "
                        f"after {self.restarts} restarts; the run cannot go on"
                    )
                idle.extend(self.members)
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                gid, shard = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except _DEAD:
                    log.warning("generator %s died; re-queueing shard %d", gid, shard.shard_id)
                    events.died.append(gid)
                    events.requeued_shards += 1
                    queue.appendleft(shard)
                    self._drop(gid)
                    idle.extend(self._replace(events))
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if hasattr(e, "cause") else None
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise
                if shard.shard_id in done:  # cannot happen with one dispatch per shard; guard anyway
                    raise PoolError(f"shard {shard.shard_id} completed twice")
                done[shard.shard_id] = result
                events.shards_per_member[gid] = events.shards_per_member.get(gid, 0) + 1
                idle.append(gid)
        rollouts = [r for sid in sorted(done) for r in done[sid]]
        return rollouts, events

    def call_all(self, method: str, *args, **kwargs) -> list[Any]:
        """Call ``method`` on every member and wait (e.g. ``info``)."""
        return ray.get([getattr(m.handle, method).remote(*args, **kwargs) for m in self.members.values()])

    def shutdown(self) -> None:
        for gid in list(self.members):
            self._drop(gid)


def request_capacity(bundle: dict[str, float], max_size: int) -> None:
    """Ask the autoscaler for room for ``max_size`` generators (no-op on a fixed cluster)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(bundle) for _ in range(max_size)])
    except Exception as e:  # a local Ray has no autoscaler to ask; that is fine
        log.debug("request_resources unavailable: %s", e)
