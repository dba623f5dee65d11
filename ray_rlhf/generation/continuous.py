"""Multi-turn rollouts with continuous batching across trajectories (``env.scheduling=continuous``).

Each trajectory is a coroutine: ``reset``, then turn by turn its request goes to the engine
(``submit``) and, when the turn is sampled, its environment steps (each call under
``env.step_timeout_s``) -- while the engine keeps decoding the other trajectories' turns. The next
turn's request is submitted as soon as its observation is ready; nothing waits for the slowest
environment of a round. The per-turn bookkeeping is the turn-synchronous schedule's
(:mod:`ray_rlhf.generation.trajectory`): same ids, masks, log-probs, rewards, finish reasons and
per-turn seeds (:func:`~ray_rlhf.generation.trajectory.turn_seed`, fixed by prompt, sample and
turn), so a trajectory does not depend on which others share the engine with it (up to the
engine's numerics for different batch shapes).

Nothing here imports vLLM: ``submit`` is any ``async`` callable
(:class:`~ray_rlhf.generation.engine_stepper.EngineStepper` drives vLLM step by step; the unit tests
use a fake).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from typing import Any

from ray_rlhf.generation.trajectory import (
    EnvStats,
    Sampled,
    TemplateDelta,
    TrajectoryLimits,
    TurnRequest,
    after_step,
    apply_reset,
    call_env,
    make_trajectories,
    next_request,
    reset_call,
    take_turn,
    to_batch,
)
from ray_rlhf.records import PromptItem, RolloutBatch

__all__ = ["EnvClock", "Submit", "run_trajectories_continuous"]

Submit = Callable[[TurnRequest], Awaitable[Sampled]]
"""Samples one turn (the engine decodes it beside whatever else is running)."""


class EnvClock:
    """Wall time with at least one environment call running (overlapping calls count once)."""

    def __init__(self) -> None:
        self.active, self.since, self.seconds = 0, 0.0, 0.0

    @contextmanager
    def running(self):
        if self.active == 0:
            self.since = time.perf_counter()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self.seconds += time.perf_counter() - self.since


async def run_trajectories_continuous(items: Sequence[PromptItem], n: int, submit: Submit,
                                      make_env: Callable[[], Any], delta: TemplateDelta, limits: TrajectoryLimits,
                                      seed: int | None = None, policy_version: int = 0,
                                      generator_id: str = "") -> tuple[RolloutBatch, EnvStats]:
    """``n`` trajectories of every prompt of ``items``, ordered by (prompt, sample), and their stats
    (as :func:`~ray_rlhf.generation.trajectory.run_trajectories`, scheduled per trajectory).

    ``stats.engine_seconds`` is left 0: the caller that drives the engine knows it.
    """
    stats, clock = EnvStats(), EnvClock()
    start = time.perf_counter()
    trajs = make_trajectories(items, n, make_env)

    async def env_call(make: Callable[[], Awaitable[Any]]) -> Any:
        with clock.running():
            try:
                return await make()
            except Exception as e:  # noqa: BLE001 - applied to its trajectory (env_error) or re-raised
                return e

    async def one(t) -> None:
        apply_reset(t, await env_call(lambda: reset_call(t, limits)), delta, limits)
        while True:
            req = next_request(t, limits, seed)
            if not take_turn(t, req, await submit(req), limits):
                return
            after_step(t, await env_call(lambda: call_env(t.env.step, t.text[-1], limits.step_timeout_s)),
                       stats, delta, limits)
            if t.finish is not None:
                return

    tasks = [asyncio.ensure_future(one(t)) for t in trajs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # a UserError in one trajectory: the others stop too
            task.cancel()
    stats.seconds = clock.seconds
    stats.wall_seconds = time.perf_counter() - start
    return to_batch(items, trajs, stats, policy_version, generator_id), stats
