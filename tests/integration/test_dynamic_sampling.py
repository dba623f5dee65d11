"""DAPO's dynamic sampling in a real tiny run (Ray + real vLLM, CPU), GRPO.

The reward (:mod:`tests.integration.dynamic_rewards`) scores only about half of the prompts, fixed
by their text; the other half's groups have zero variance. With 4 prompts per step, 2 samples each
and at most 3 rounds, steps need several rounds and some end with fewer than 4 groups. Checked:
the metrics, that every trained group (the rollout log) has reward variance and comes from the
step's rounds in the stream's order, and that a run stopped after step 2 and resumed equals the
uninterrupted one (the data cursor covers the extra rounds' prompts; their seeds are their own).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from tests.integration.dynamic_rewards import scored_prompt
from tests.integration.runs import run_tiny
from tests.integration.test_resume import NOT_COMPARED, _close, _responses

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

PROMPTS, SAMPLES, ROUNDS = 4, 2, 3
DYNAMIC = ("algo.estimator=grpo", "rollout.dynamic_sampling=true", f"rollout.max_sampling_rounds={ROUNDS}",
           f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
           "reward.functions=[{name: tests.integration.dynamic_rewards:letters_on_even_prompts}]")
"""On top of :data:`~tests.integration.runs.OVERRIDES` (4 steps, checkpoints at 2 and 4, minibatches of 8)."""


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory, models_dir) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("dynamic")
    return out, run_tiny(out, models_dir, *DYNAMIC)


def test_trains_only_on_groups_with_reward_variance(dynamic_run):
    from ray_rlhf.data.prompts import PromptStream, bundled_prompts_path, load_prompts
    from ray_rlhf.metrics import read_rollouts
    from tests.integration.test_system import documented_keys, is_documented

    out, rows = dynamic_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    documented = documented_keys()
    assert not [k for r in rows for k in r if not is_documented(k, documented)]
    log = defaultdict(list)
    for r in read_rollouts(out).to_pylist():
        log[r["step"]].append(r)
    stream = PromptStream(load_prompts(bundled_prompts_path()), seed=0)
    for row in rows:
        step, rounds, discarded = row["step"], row["rollout/sampling_rounds"], row["rollout/discarded_groups"]
        assert 1 <= rounds <= ROUNDS
        drawn = stream.next_batch(PROMPTS * rounds)  # every round's prompts, in order
        groups = defaultdict(list)
        for r in log[step]:
            groups[r["prompt_index"]].append(r)
        trained = len(groups)
        assert row["rollout/count"] == len(log[step]) == trained * SAMPLES and 1 <= trained <= PROMPTS
        for prompt_index, g in groups.items():
            assert sorted(r["sample_index"] for r in g) == list(range(SAMPLES))
            assert len({r["reward"] for r in g}) > 1, f"step {step}: prompt {prompt_index} has no reward variance"
            assert scored_prompt(g[0]["prompt"])
        # The first informative groups in the order the rounds drew them.
        order = [p.index for p in drawn if p.index in groups]
        assert [r["prompt_index"] for r in log[step]][::SAMPLES] == order and len(order) == trained
        if trained < PROMPTS:  # the rounds ran out: everything else was zero-variance
            assert rounds == ROUNDS and discarded == PROMPTS * rounds - trained
        else:
            assert discarded <= PROMPTS * rounds - trained
        assert discarded >= sum(not scored_prompt(p.text) for p in drawn)  # those never vary
    assert sum(r["rollout/discarded_groups"] for r in rows) > 0
    assert max(r["rollout/sampling_rounds"] for r in rows) >= 2
    print("rounds", [r["rollout/sampling_rounds"] for r in rows], "discarded",
          [r["rollout/discarded_groups"] for r in rows], "count", [r["rollout/count"] for r in rows])


def test_stop_and_resume_matches_uninterrupted(tmp_path, models_dir, dynamic_run):
    a_dir, a_rows = dynamic_run
    b_dir = tmp_path / "stopped"
    assert [r["step"] for r in run_tiny(b_dir, models_dir, *DYNAMIC, "faults.stop=[{step: 2}]")] == [1, 2]
    b_rows = run_tiny(b_dir, models_dir, *DYNAMIC)  # resumes from step_000002
    assert [r["step"] for r in b_rows] == [1, 2, 3, 4]
    mismatches = [f"step {a['step']} {key}: uninterrupted {a[key]!r} vs resumed {b.get(key)!r}"
                  for a, b in zip(a_rows, b_rows) for key in sorted(a)
                  if not key.startswith(NOT_COMPARED) and not _close(a[key], b.get(key))]
    assert not mismatches, "\n".join(mismatches)
    for step in (3, 4):
        assert _responses(a_dir, step) == _responses(b_dir, step), f"trained-on responses differ at step {step}"
    assert sum(r["rollout/sampling_rounds"] for r in a_rows[:2]) > 2  # the cursor had extra rounds to cover
