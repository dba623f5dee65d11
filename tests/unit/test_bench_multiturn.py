"""``ray-rlhf bench`` on a multi-turn run: model tokens only, the environment as its own phase, the
engine's busy fraction -- from hand-made ``metrics.jsonl`` rows."""

from __future__ import annotations

import pytest

from ray_rlhf.bench.endtoend import summarize
from ray_rlhf.bench.report import multiturn_md


def row(step: int, generate: float, response_tokens: float, observation_tokens: float, env_s: float, busy: float):
    return {"step": step, "time/generate": generate, "time/reward": 0.1, "ppo/prepare_seconds": 0.2,
            "ppo/update_seconds": 0.3, "time/sync": 0.05, "time/step": generate + 0.7,
            "perf/samples_per_s": 10.0, "perf/generated_tokens_per_s": response_tokens / generate,
            "response/length_mean": 30.0, "sync/seconds": 0.04, "sync/bytes": 1000,
            "env/seconds": env_s, "env/observation_tokens": observation_tokens, "env/turns_mean": 2.0,
            "perf/engine_busy_fraction": busy}


def test_model_tokens_environment_phase_and_busy_fraction():
    # step 1 is warm-up (skipped). Steps 2, 3: 300 and 500 response tokens of which 100 and 100 are
    # observation tokens -> 200 + 400 model tokens over 2 + 4 s of generate = 100 model tokens/s.
    rows = [row(1, 9.0, 900, 0, 5.0, 0.1), row(2, 2.0, 300, 100, 1.0, 0.5), row(3, 4.0, 500, 100, 3.0, 0.7)]
    e2e = summarize(rows, "out", [])
    assert e2e["multi_turn"] and e2e["per_step"][1]["generated_tokens"] == pytest.approx(200)
    m = e2e["mean"]
    assert m["generated_tokens_per_s"] == pytest.approx(100.0)
    assert m["env"] == pytest.approx(2.0) and m["engine_busy_fraction"] == pytest.approx(0.6)
    assert m["generate"] == pytest.approx(3.0) and m["turns_mean"] == 2.0
    md = "\n".join(multiturn_md({"endtoend": e2e, "config": {"env_scheduling": "continuous"}}))
    # | continuous | 100 | 3 | 2 | 66.7% | 0.6 | 2 |
    assert "| continuous | 100 | 3 | 2 | 66.7% | 0.6 | 2 |" in md and "model tokens only" in md


def test_single_turn_runs_have_no_multi_turn_section():
    rows = [{k: v for k, v in row(s, 2.0, 300, 0, 0, 0).items() if not k.startswith("env/")} for s in (1, 2)]
    e2e = summarize(rows, "out", [])
    assert not e2e["multi_turn"] and "env" not in e2e["mean"]
    assert e2e["mean"]["generated_tokens_per_s"] == pytest.approx(150.0)
    assert multiturn_md({"endtoend": e2e, "config": {}}) == []


def test_a_sweep_value_equal_to_the_base_config_reuses_its_run():
    """``same_run``: configs that differ only in ``output_dir`` are one run (the sweep reuses the
    end-to-end section's); any other key makes them two."""
    from ray_rlhf.bench.run import same_run
    from ray_rlhf.config import load_config

    base = load_config("tiny", ["output_dir=/tmp/a"])
    assert same_run(base, load_config("tiny", ["output_dir=/tmp/b/sweep-1", "generators.num=2"]))
    assert not same_run(base, load_config("tiny", ["output_dir=/tmp/a", "generators.num=1"]))
