"""Stop a tiny run after step 2 and resume it to step 4: the same numbers as an uninterrupted run.

Three in-process runs of :func:`ray_rlhf.run.driver.run` on the tiny preset (Ray + real vLLM, CPU),
each in a fresh Ray (``ray.shutdown()`` between runs, as a new driver process would have):

* A: 4 steps uninterrupted, ``checkpoint.every=2``;
* B: the same command with ``faults.stop=[{step: 2}]`` (exits after step 2's checkpoint, as if
  preempted); then, after adding the debris a driver killed mid-step could leave (metrics rows past
  the checkpoint, one torn; a half-written ``.tmp-*`` checkpoint; a ``step_*`` dir without its
  ``COMPLETE`` marker), B again without the fault, which resumes from ``step_000002``
  (``resume=auto``).

Steps 3-4 of B must equal A's: rewards, losses, KL, approx_kl, clip fraction, response lengths --
every metric except timings -- to a relative 1e-4, and the generated responses exactly. That covers
every piece of state a checkpoint must carry: the data cursor, the learner's shuffling RNG, the
optimizer moments, the KL controller, the policy version (which seeds nothing but tags rollouts),
and the per-request vLLM sampling seeds, derived from (seed, step, prompt index) and not from any
state of the generator.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.integration.runs import run_tiny as _run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

NOT_COMPARED = ("time/", "perf/", "sync/seconds", "sync/verify_seconds", "ppo/prepare_seconds", "ppo/update_seconds")
"""Wall-clock measurements: everything else in a metrics row must match."""


def _responses(out: Path, step: int) -> list[tuple]:
    import pyarrow.parquet as pq

    from ray_rlhf.metrics import rollout_file

    t = pq.read_table(rollout_file(out, step)).to_pydict()
    return sorted(zip(t["prompt_index"], t["sample_index"], t["response"], t["response_tokens"], t["reward"]))


def _close(a, b, rel=1e-4, abs_=1e-6) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def _leave_crash_debris(run_dir: Path) -> None:
    """What a driver killed during steps 3-4 could leave: logged-but-uncheckpointed metrics rows
    (one torn), a half-written temporary checkpoint, and a step directory without its marker."""
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/mean": 123.0}\n{"step": 4, "reward/me')
    tmp = run_dir / "checkpoints" / ".tmp-step_000004-deadbeef"
    tmp.mkdir()
    (tmp / "learner.json").write_text('{"version": 4')
    (run_dir / "checkpoints" / "step_000004").mkdir()
    (run_dir / "checkpoints" / "step_000004" / "driver.json").write_text("{}")


def test_stop_and_resume_matches_uninterrupted(tmp_path, models_dir, uninterrupted):
    from ray_rlhf.checkpoint import open_store

    a_dir, a_rows = uninterrupted
    assert [r["step"] for r in a_rows] == [1, 2, 3, 4]

    b_dir = tmp_path / "stopped"
    stopped = _run(b_dir, models_dir, "faults.stop=[{step: 2}]")
    assert [r["step"] for r in stopped] == [1, 2]
    assert [c.step for c in open_store(b_dir).list_complete()] == [2]

    _leave_crash_debris(b_dir)
    b_rows = _run(b_dir, models_dir)  # the same command again: resume=auto picks step_000002
    assert [r["step"] for r in b_rows] == [1, 2, 3, 4], "metrics.jsonl must hold each step once"
    assert [c.step for c in open_store(b_dir).list_complete()] == [2, 4]
    assert sorted(p.name for p in (b_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]

    mismatches = []
    for a, b in zip(a_rows, b_rows):
        assert set(a) == set(b)
        for key in sorted(a):
            if key.startswith(NOT_COMPARED):
                continue
            if not _close(a[key], b[key]):
                mismatches.append(f"step {a['step']} {key}: uninterrupted {a[key]!r} vs resumed {b[key]!r}")
    assert not mismatches, "\n".join(mismatches)
    for step in (3, 4):
        assert _responses(a_dir, step) == _responses(b_dir, step), f"generated responses differ at step {step}"
    # Sanity: the compared metrics move from step to step (a frozen run would match trivially).
    assert a_rows[2]["ppo/policy_loss"] != a_rows[3]["ppo/policy_loss"]
    assert a_rows[3]["ppo/kl_ref"] > 0


def test_two_learner_ranks_give_the_one_rank_run_and_resume_at_world_size_two(tmp_path, models_dir, uninterrupted):
    """The same run with ``learner.num=2`` (DDP, gloo), stopped after step 2 and resumed: every
    step equals the one-learner uninterrupted run -- the update is the whole batch's at any world
    size, and the group's checkpoint carries all of its state. The tolerance is looser than for
    resume (1e-3): two ranks sum the gradient in another order (parameters agree to ~1e-5)."""
    _, a_rows = uninterrupted
    d = tmp_path / "two-ranks"
    two = ("learner.num=2", "learner.num_cpus=0.25")  # Ray's CPU share only: each rank still gets 1 thread
    assert [r["step"] for r in _run(d, models_dir, *two, "faults.stop=[{step: 2}]")] == [1, 2]
    rows = _run(d, models_dir, *two)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    def close(key, x, y):
        if key == "ppo/value_clipfrac":  # a fraction of tokens past a threshold (|V - V_old| > 0.2):
            return _close(x, y, rel=0, abs_=0.03)  # ~1e-5 apart values flip the ones right at it
        return _close(x, y, rel=1e-3, abs_=1e-5)

    mismatches = [f"step {a['step']} {key}: one rank {a[key]!r} vs two ranks {b[key]!r}"
                  for a, b in zip(a_rows, rows) for key in sorted(a)
                  if not key.startswith(NOT_COMPARED) and not close(key, a[key], b.get(key))]
    assert not mismatches, "\n".join(mismatches)
    for step in (1, 2, 3, 4):
        assert [r[:4] for r in _responses(uninterrupted[0], step)] == [r[:4] for r in _responses(d, step)], step
