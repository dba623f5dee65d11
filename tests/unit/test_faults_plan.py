"""Fault injection's wiring (ray_rlhf/run/faults.py), without Ray: which generation call and which
update a configured fault belongs to, and what the pool's wrapper does around the real call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ray_rlhf.config import load_config
from ray_rlhf.generation.pool import GeneratorPool, PoolEvents
from ray_rlhf.records import SamplingSpec
from ray_rlhf.run import faults as faults_module
from ray_rlhf.run.faults import FaultPlan, FaultyPool
from ray_rlhf.run.sampling import round_sampling

FAULTS = ["steps=5", "faults.kill_generator=[{step: 2, index: 0}]", "faults.hang_generator=[{step: 4, index: 1}]",
          "faults.kill_reward=[{step: 2}]", "faults.kill_learner=[{step: 3}]"]


def plan(*overrides: str) -> tuple[FaultPlan, object]:
    cfg = load_config("tiny", list(overrides))
    return FaultPlan(cfg), cfg


def test_a_steps_first_round_carries_its_rollout_faults_later_rounds_none():
    p, cfg = plan(*FAULTS)
    step = {s: SamplingSpec.for_step(cfg.rollout, cfg.seed, s) for s in range(1, 6)}
    assert [p.rollout_step(step[s]) for s in range(1, 6)] == [None, 2, None, 4, None]
    # dynamic sampling's rounds 1, 2 of step 2 have seeds of their own: no fault again
    assert [p.rollout_step(round_sampling(step[2], r)) for r in (1, 2)] == [None, None]
    assert (p.generators_to_kill(2), p.generators_to_hang(2), p.kills_reward(2)) == ([0], [], True)
    assert (p.generators_to_kill(4), p.generators_to_hang(4), p.kills_reward(4)) == ([], [1], False)


def test_the_learner_dies_once_in_its_step():
    p, _ = plan(*FAULTS)
    assert p.learner_kill_pending and not p.kills_learner(2)
    assert p.kills_learner(3)
    assert not p.learner_kill_pending and not p.kills_learner(3)  # the recovered run replays step 3 unharmed


def test_only_actor_faults_wrap_the_actors():
    assert plan(*FAULTS)[0].breaks_actors
    assert not plan("steps=3", "faults.stop=[{step: 2}]")[0].breaks_actors
    assert not plan()[0].breaks_actors
    p, _ = plan("steps=3", "faults.stop=[{step: 2}]")
    assert [p.stop_after(s, 3) for s in (1, 2, 3)] == [False, True, False]


@pytest.fixture
def faulty_pool(monkeypatch):
    """A FaultyPool around a recording stand-in for the real pool's work (no actors)."""
    p, cfg = plan(*FAULTS)
    done: list = []
    pool = object.__new__(FaultyPool)
    pool.plan, pool.reward = p, "reward-actor"
    monkeypatch.setattr(GeneratorPool, "generate", lambda self, shards, sampling: done.append(("generate",)) or
                        ([], PoolEvents()))
    monkeypatch.setattr(GeneratorPool, "kill", lambda self, i: done.append(("kill", i)) or f"gen-{i}")
    monkeypatch.setattr(FaultyPool, "hang", lambda self, i: done.append(("hang", i)) or f"gen-{i}")
    monkeypatch.setattr(faults_module, "ray", SimpleNamespace(
        kill=lambda actor, no_restart: done.append(("kill reward", actor, no_restart))))
    return pool, cfg, done


def test_the_pool_breaks_generators_before_the_real_generate_and_the_reward_after(faulty_pool):
    pool, cfg, done = faulty_pool
    for s in range(1, 6):
        pool.generate([], SamplingSpec.for_step(cfg.rollout, cfg.seed, s))
        if s == 2:
            pool.generate([], round_sampling(SamplingSpec.for_step(cfg.rollout, cfg.seed, s), 1))
    assert done == [("generate",),
                    ("kill", 0), ("generate",), ("kill reward", "reward-actor", False), ("generate",),  # step 2
                    ("generate",),
                    ("hang", 1), ("generate",),
                    ("generate",)]
