"""``ray-rlhf bench``: in-loop and standalone generation compared on the same work -- which runs
replay the loop's weights, the exact token counts, and how the report counts replayed and equal
steps -- from hand-made rows (the real replay runs in ``tests/e2e/test_benchmarks_quick.py``)."""

from __future__ import annotations

import pytest

from ray_rlhf.bench.endtoend import keeps_weights, summarize
from ray_rlhf.bench.generation import compare
from ray_rlhf.bench.report import _same_work
from ray_rlhf.config import load_config


def e2e_row(step: int, generate: float, tokens: int, rate_error: float = 1.0) -> dict:
    # perf/generated_tokens_per_s as logged may be off in its last digits; ppo/response_tokens is exact
    return {"step": step, "time/generate": generate, "time/reward": 0.1, "ppo/prepare_seconds": 0.2,
            "ppo/update_seconds": 0.3, "time/sync": 0.05, "time/step": generate + 0.7,
            "perf/samples_per_s": 10.0, "perf/generated_tokens_per_s": tokens / generate * rate_error,
            "ppo/response_tokens": tokens, "response/length_mean": 30.0, "sync/seconds": 0.04, "sync/bytes": 1000}


def test_the_token_count_is_the_learners_exact_one():
    e2e = summarize([e2e_row(1, 2.0, 300), e2e_row(2, 3.0, 700, rate_error=1.001)], "out", [])
    assert e2e["per_step"][1]["generated_tokens"] == 700  # not 700.7 from the rate times the time
    legacy = summarize([{k: v for k, v in e2e_row(s, 2.0, 300).items() if k != "ppo/response_tokens"}
                        for s in (1, 2)], "out", [])
    assert legacy["per_step"][1]["generated_tokens"] == pytest.approx(300)  # older runs: rate x time


def test_only_synchronous_full_weight_runs_replay_the_loops_weights():
    assert keeps_weights(load_config("tiny", []))
    assert not keeps_weights(load_config("tiny", ["rollout.max_staleness=1"]))  # generators mix versions
    assert not keeps_weights(load_config("tiny", ["lora.rank=4", "lora.sync=adapter"]))  # no full weights


def test_compare_counts_replayed_and_equal_steps():
    # steps 2, 3 compared (step 1 is warm-up); step 2 replayed with equal tokens, step 3 with one more
    e2e = summarize([e2e_row(1, 2.0, 300), e2e_row(2, 2.0, 400), e2e_row(3, 4.0, 800)], "out", [])
    bound = {"per_step": [{"step_index": 1, "G": 2.0, "tokens": 300, "loop_weights": False},
                          {"step_index": 2, "G": 2.0, "tokens": 400, "loop_weights": True},
                          {"step_index": 3, "G": 4.0, "tokens": 801, "loop_weights": True}],
             "standalone_tokens_per_s": 1201 / 6.0}
    hf = {"per_step": [{"step_index": 2, "tokens": 400, "seconds": 4.0}], "tokens_per_s": 100.0}
    g = compare(e2e, bound, hf)
    assert (g["compared_steps"], g["same_weights_steps"], g["equal_tokens_steps"]) == (2, 2, 1)
    assert [r["same_weights"] for r in g["per_step_tokens_per_s"]] == [True, True]
    assert g["in_loop_over_standalone"] == pytest.approx((1200 / 6.0) / (1201 / 6.0))
    assert _same_work(g) == ("standalone generation replayed the loop's weights on 2 of 2 compared steps, "
                             "with equal token counts on 1")
    assert _same_work({}) == "standalone generation used the initial weights"  # a results.json of before
