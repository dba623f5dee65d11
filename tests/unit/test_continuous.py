"""``env.scheduling=continuous`` without vLLM: the per-trajectory coroutines against a fake engine
give the turn-synchronous schedule's rows, faults end only their trajectory, the environment time
counts overlapping calls once, and ``perf/engine_busy_fraction`` is busy over wall seconds."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from ray_rlhf.envs.letters import LetterGame
from ray_rlhf.errors import UserError
from ray_rlhf.generation.continuous import EnvClock, run_trajectories_continuous
from ray_rlhf.generation.trajectory import Sampled, TemplateDelta, TrajectoryLimits, run_trajectories
from ray_rlhf.run.observe import env_metrics
from tests.unit.test_trajectory import AsyncGame, Hangs, Raises, ResetFails, WrongShape, items, rows

REPLIES = (" eee", " aaa bb", " ooo e", " i")
LIMITS = TrajectoryLimits(max_new_tokens=8, max_turns=4, max_total_tokens=120, step_timeout_s=5.0)


@pytest.fixture(scope="module")
def tok():
    from ray_rlhf.models.factory import train_tokenizer

    return train_tokenizer(512)


def reply(tok, r) -> Sampled:
    """The reply a seeded engine gives: fixed by the request's seed, whatever else runs beside it."""
    ids = tok(REPLIES[r.seed % len(REPLIES)], add_special_tokens=False)["input_ids"]
    finish = "stop"
    if len(ids) > r.max_tokens:
        ids, finish = ids[: r.max_tokens], "length"
    return Sampled(ids, [-0.5 - 0.01 * i for i in range(len(ids))], finish, tok.decode(ids))


def test_continuous_rows_equal_the_turn_synchronous_rows(tok):
    d, rng = TemplateDelta(tok), random.Random(0)
    prompts = items(tok, ("The cat sat on", "Water is", "a b c"))
    sync, s1 = run_trajectories(prompts, 2, lambda reqs: [reply(tok, r) for r in reqs],
                                lambda: LetterGame(turns=3), d, LIMITS, seed=5)
    order = []

    async def submit(r):  # turns finish in a random order
        await asyncio.sleep(rng.uniform(0, 0.01))
        order.append(r.seed)
        return reply(tok, r)

    cont, s2 = asyncio.run(run_trajectories_continuous(prompts, 2, submit, lambda: AsyncGame(turns=3), d, LIMITS,
                                                       seed=5))
    assert list(rows(cont)) == list(rows(sync)) and cont.finish_reason.tolist() == sync.finish_reason.tolist()
    assert (s2.turns, s2.observation_tokens, s2.reward_sum) == (s1.turns, s1.observation_tokens, s1.reward_sum)
    assert len(order) == s2.turns == 18 and s2.engine_seconds == 0.0 and s2.wall_seconds > s2.seconds > 0


def test_faults_end_only_their_trajectory_and_a_wrong_shape_stops_the_shard(tok):
    d, n = TemplateDelta(tok), iter(range(100))
    envs = {0: Raises, 1: Hangs, 2: AsyncGame, 3: ResetFails}

    async def submit(r):
        return reply(tok, r)

    t0 = time.perf_counter()
    b, stats = asyncio.run(run_trajectories_continuous(items(tok, ("a b", "c d", "e f", "g h")), 1, submit,
                                                       lambda: envs[next(n)](turns=2), d,
                                                       TrajectoryLimits(8, 4, 120, 0.3), seed=1))
    assert time.perf_counter() - t0 < 2.5  # the hung step was not waited for
    assert b.finish_reason.tolist() == ["env_error", "env_error", "stop", "env_error"]
    assert b.turn_count.tolist() == [1, 1, 2, 1] and stats.errors == 3
    with pytest.raises(UserError, match="WrongShape"):
        asyncio.run(run_trajectories_continuous(items(tok), 2, submit, lambda: WrongShape(), d, LIMITS, seed=1))


def test_env_clock_counts_overlapping_calls_once():
    clock = EnvClock()

    async def call(delay, length):
        await asyncio.sleep(delay)
        with clock.running():
            await asyncio.sleep(length)

    async def main():
        # [0, 0.2] and [0.1, 0.3] overlap: 0.3 s; then [0.5, 0.6]: 0.1 s -> 0.4 s in all
        await asyncio.gather(call(0, 0.2), call(0.1, 0.2), call(0.5, 0.1))

    asyncio.run(main())
    assert clock.seconds == pytest.approx(0.4, abs=0.05) and clock.active == 0


def test_engine_busy_fraction_is_busy_over_wall_seconds_of_all_shards():
    # two shards: 3 s busy of 4 s, 1 s busy of 4 s -> 4 / 8
    m = env_metrics({"trajectories": 4, "turns": 8, "engine_seconds": 4.0, "wall_seconds": 8.0})
    assert m["perf/engine_busy_fraction"] == 0.5 and m["env/turns_mean"] == 2.0
    assert "perf/engine_busy_fraction" not in env_metrics({"trajectories": 4})  # no timing: no metric
