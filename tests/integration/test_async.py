"""Asynchronous PPO on a real local Ray with real vLLM (CPU): ``rollout.max_staleness = k``.

Step ``s`` is sampled by version ``max(0, s - 1 - k)`` while the learner trains step ``s - 1``.
Checked on every rollout of every run: the recorded staleness never exceeds ``k`` (the learner
also refuses such a batch itself), each step holds exactly one scored result per (prompt,
sample), the learner weights stale samples by pi_old / pi_sampler (1 on the fresh first step,
not 1 on every stale one), the policy learns; a generator killed mid-run loses and duplicates
nothing; a run stopped and resumed equals the uninterrupted run (the in-flight batches travel in
the checkpoint).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import pytest
import ray

from ray_rlhf.config import load_config
from ray_rlhf.data.prompts import PromptStream, bundled_prompts_path, load_prompts
from ray_rlhf.metrics import read_rollouts
from ray_rlhf.run.driver import run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PROMPTS, SAMPLES = 16, 4


@pytest.fixture
def fresh_ray():
    yield
    ray.shutdown()


def overrides(out: Path, cache: Path, k: int, steps: int, *extra) -> list[str]:
    return [f"output_dir={out}", f"model.cache_dir={cache}", f"steps={steps}", f"rollout.max_staleness={k}",
            "ray.num_cpus=2", "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.every=0",
            "generators.shard_prompts=2", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_rollouts(out: Path, k: int, steps: int) -> list[dict]:
    """Every step: exactly one result per (prompt, sample) of the stream's prompts, all sampled by
    version max(0, step - 1 - k): never more than k behind the learner (at step - 1)."""
    rows = read_rollouts(out).to_pylist()
    stream = PromptStream(load_prompts(bundled_prompts_path()), seed=0)
    for step in range(1, steps + 1):
        want = Counter((p.index, s) for p in stream.next_batch(PROMPTS) for s in range(SAMPLES))
        got = [r for r in rows if r["step"] == step]
        assert Counter((r["prompt_index"], r["sample_index"]) for r in got) == want, f"step {step}"
        versions = {r["policy_version"] for r in got}
        assert versions == {max(0, step - 1 - k)}, (step, versions)
        assert all((step - 1) - v <= k for v in versions)
    return rows


def check_importance_weights(rows: list[dict]) -> None:
    """The decoupled-PPO weight w = pi_old / pi_sampler (``algo/off_policy.py``) as the metrics log
    it: pi_old is the learner's log-prob at its own version, pi_sampler the generator's at the
    version that sampled. A fresh batch (lag 0, step 1) has both at the same weights: w = 1 up to
    the engines' numerics (vLLM vs the learner, ~1e-7 in log-prob). A stale one (lag >= 1) was
    sampled by weights the learner has since updated: its tokens' weights spread around 1 (their
    mean under the sampler is 1 before the cap), so the largest is clearly above 1. A learner that
    ignored the sampler's log-probs, or compared pi_old with itself, logs 1 / 1 everywhere."""
    fresh = [r for r in rows if r["rollout/staleness_max"] == 0]
    stale = [r for r in rows if r["rollout/staleness_mean"] >= 1]
    assert fresh and len(stale) >= len(rows) - 2, [r["rollout/staleness_mean"] for r in rows]
    for r in fresh:
        assert abs(r["ppo/is_weight_max"] - 1) < 1e-3 and abs(r["ppo/is_weight_mean"] - 1) < 1e-4, r
    for r in stale:
        assert r["ppo/is_weight_max"] > 1.01, (r["step"], r["ppo/is_weight_max"])
        assert r["ppo/is_weight_mean"] != 1.0 and 0 < r["ppo/is_weight_mean"] <= 2.0, (r["step"], r["ppo/is_weight_mean"])
    print("is_weight_max by step:", [round(r["ppo/is_weight_max"], 4) for r in rows])
    print("is_weight_mean by step:", [round(r["ppo/is_weight_mean"], 6) for r in rows])


def test_async_learns_within_the_staleness_bound_and_survives_a_generator_death(tmp_path, tiny_policy_path, fresh_ray):
    k, steps = 1, 14  # k = 2: the resume test below
    out = run(load_config("tiny", overrides(tmp_path, tiny_policy_path.parent, k, steps,
                                            "faults.kill_generator=[{step: 5, index: 0}]")))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert max(r["rollout/staleness_max"] for r in rows) == k and all(r["rollout/staleness_max"] <= k for r in rows)
    assert rows[4]["pool/deaths"] == 1 and rows[4]["pool/requeued_shards"] >= 1
    assert all(r["sync/verified"] == 1.0 for r in rows)
    check_rollouts(out, k, steps)
    check_importance_weights(rows)
    rewards = [r["reward/mean"] for r in rows]
    first, last = statistics.mean(rewards[:4]), statistics.mean(rewards[-4:])
    print(f"k={k}: reward/mean first 4 steps {first:.3f}, last 4 steps {last:.3f}; learner waited "
          f"{statistics.mean(r['time/learner_wait'] for r in rows[2:]):.2f} s/step")
    assert last > first + 0.03, rewards


def test_async_stop_and_resume_equals_the_uninterrupted_run(tmp_path, tiny_policy_path, fresh_ray):
    """k = 2: the checkpoint at step 2 carries the two steps already produced (3 and 4)."""
    k, steps, cache = 2, 5, tiny_policy_path.parent
    whole = run(load_config("tiny", overrides(tmp_path / "whole", cache, k, steps)))
    ray.shutdown()
    part = tmp_path / "part"
    run(load_config("tiny", overrides(part, cache, k, steps, "faults.stop=[{step: 2}]")))
    ray.shutdown()
    assert [r["step"] for r in metrics(part)] == [1, 2]
    pending = part / "checkpoints" / "step_000002" / "pending"
    assert sorted(p.name for p in pending.iterdir()) == ["step_000003.parquet", "step_000004.parquet"]
    run(load_config("tiny", overrides(part, cache, k, steps)))  # the same command again: resumes at step 2
    a, b = metrics(whole), metrics(part)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert max(r["rollout/staleness_max"] for r in b) == k
    for ra, rb in zip(a, b):
        for key in ("reward/mean", "ppo/policy_loss", "ppo/kl_ref", "ppo/grad_norm", "rollout/staleness_max"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    check_rollouts(part, k, steps)
    wa = {(r["step"], r["prompt_index"], r["sample_index"]): r["response"] for r in read_rollouts(whole).to_pylist()}
    wb = {(r["step"], r["prompt_index"], r["sample_index"]): r["response"] for r in read_rollouts(part).to_pylist()}
    assert wa == wb
