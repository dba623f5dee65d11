"""A multi-turn run (LetterGame, two model turns per trajectory, the reward from the environment
only) stopped after step 1 and resumed to step 2 equals the uninterrupted run -- with a generator
killed in the middle of a trajectory on the way.

Three in-process runs of :func:`ray_rlhf.run.driver.run` (tiny preset, Ray + real vLLM on CPU, two
generators pulling shards of 2 prompts), as in ``test_resume.py``:

* A: 2 steps with ``LetterGame``, uninterrupted;
* B: the same with ``LetterGameDiesOnce`` (:mod:`tests.integration.dying_env`: the first trajectory
  to reach the environment's first ``step`` kills its generator process between turn 1 and turn 2)
  and ``faults.stop=[{step: 1}]``; then B again without the stop, resuming from ``step_000001``.

Every step of B equals A's -- rewards, losses, KL, the environment's metrics (timings and the pool's
own counters aside) to a relative 1e-4 and the generated conversations exactly: the dead
generator's shard was re-run whole on its replacement (nothing lost, nothing duplicated: each
(prompt, sample) once per step), and a checkpoint carries everything a multi-turn run needs.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.runs import run_tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MULTI_TURN = ("steps=2", "checkpoint.every=1", "env.max_turns=2", "reward.functions=[]",
              "rollout.max_new_tokens=12", "rollout.max_total_tokens=128")
NOT_COMPARED = ("time/", "perf/", "pool/", "sync/seconds", "sync/verify_seconds", "ppo/prepare_seconds",
                "ppo/update_seconds", "env/seconds")
"""Wall-clock measurements and the pool's membership counters: everything else must match."""


def _conversations(out: Path, step: int) -> list[tuple]:
    import pyarrow.parquet as pq

    from ray_rlhf.metrics import rollout_file

    t = pq.read_table(rollout_file(out, step)).to_pydict()
    return sorted(zip(t["prompt_index"], t["sample_index"], t["response"], t["response_tokens"]))


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
    return a == b


def test_multi_turn_stop_resume_and_a_generator_dying_mid_trajectory_equal_the_plain_run(tmp_path, models_dir):
    from ray_rlhf.checkpoint import open_store

    a_rows = run_tiny(tmp_path / "a", models_dir, *MULTI_TURN, "env.name=ray_rlhf.envs.letters:LetterGame")
    marker = tmp_path / "died"
    dying = (*MULTI_TURN, "env.name=tests.integration.dying_env:LetterGameDiesOnce", f"env.kwargs={{marker: '{marker}'}}")
    b_dir = tmp_path / "b"
    stopped = run_tiny(b_dir, models_dir, *dying, "faults.stop=[{step: 1}]")
    assert [r["step"] for r in stopped] == [1]
    assert marker.exists(), "no generator died"
    assert sum(r["pool/deaths"] for r in stopped) == 1 and stopped[0]["pool/requeued_shards"] >= 1
    assert [c.step for c in open_store(b_dir).list_complete()] == [1]
    b_rows = run_tiny(b_dir, models_dir, *dying)
    assert [r["step"] for r in b_rows] == [1, 2]

    assert all(r["env/turns_mean"] == 2.0 and r["env/errors"] == 0 for r in a_rows + b_rows)
    mismatches = [f"step {a['step']} {k}: uninterrupted {a[k]!r} vs stopped/killed/resumed {b.get(k)!r}"
                  for a, b in zip(a_rows, b_rows) for k in sorted(a)
                  if not k.startswith(NOT_COMPARED) and not _close(a[k], b.get(k))]
    assert not mismatches, "\n".join(mismatches)
    for step in (1, 2):
        a, b = _conversations(tmp_path / "a", step), _conversations(b_dir, step)
        assert a == b, f"conversations differ at step {step}"
        assert set(Counter((p, s) for p, s, *_ in b).values()) == {1} and len(b) == 16  # 8 prompts x 2, once each
        assert all("\nuser: Use the letter " in r[2] for r in b)  # both turns, the observation between them
    assert a_rows[0]["ppo/policy_loss"] != a_rows[1]["ppo/policy_loss"]  # the compared numbers move
    assert a_rows[1]["ppo/kl_ref"] > 0  # step 2 sampled from the updated policy
