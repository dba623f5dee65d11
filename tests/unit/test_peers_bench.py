"""The peer benchmark's driver (``benchmarks/peers/run.py``) without running anything: the
ray-rlhf command it builds resolves to the config it means (a renamed key breaks this test), and
its summary and table compute what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ray_rlhf.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_run", ROOT / "benchmarks" / "peers" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("config, variant", [(c, v) for c in ("short", "long", "grpo")
                                             for v in ("ray-rlhf", "ray-rlhf-async", "ray-rlhf-small-critic")
                                             if not (c == "grpo" and v.endswith("critic"))])
def test_the_ray_rlhf_side_resolves_to_equal_work(peers, config, variant, tmp_path):
    assert peers.applies(config, variant)
    algo, tokens = peers.CONFIGS[config]
    inputs = {"reward": str(tmp_path / "rm"), "critic_lm": str(tmp_path / "critic")}
    cfg = load_config("small", [*peers.ray_rlhf_overrides(inputs, algo, tokens, 3, 1e-4, tmp_path / "o", tmp_path),
                                *(o.format(**inputs) for o in peers.RAY_RLHF_VARIANTS[variant])])
    r = cfg.rollout
    assert r.prompts_per_step * r.samples_per_prompt == 64 and r.max_new_tokens == tokens and r.ignore_eos
    assert cfg.algo.estimator == ("grpo" if algo == "grpo" else "gae")
    assert cfg.ppo.epochs == 1 and cfg.ppo.minibatch_size == 32 and cfg.kl.beta == 0.05
    assert cfg.reward.model_path == inputs["reward"] and not cfg.reward.functions
    assert r.max_staleness == (1 if variant.endswith("async") else 0)
    assert cfg.model.critic_path == (inputs["critic_lm"] if variant.endswith("small-critic") else None)


def test_summary_skips_the_first_step_and_the_table_compares_with_trl(peers):
    def run(step_s):
        return {"steps": [{"step_s": s, "generate_s": s / 4, "learner_s": s / 2, "generated_tokens": 4096}
                          for s in step_s]}

    trl, ours = peers.summarize(run([100.0, 8.0, 10.0, 12.0])), peers.summarize(run([50.0, 5.0]))
    assert trl["step_s"] == 10.0 and trl["generate_s"] == 2.5 and trl["s_per_1k_tokens"] == pytest.approx(10 / 4.096)
    assert ours["step_s"] == 5.0
    text = peers.table({"short": {"trl": [trl], "ray-rlhf": [ours]}}, "some CPU")
    assert "| trl | 10.00 |" in text and "| ray-rlhf | 5.00 |" in text and "2.00x |" in text
    assert not peers.applies("grpo", "trl-policy-critic") and peers.applies("short", "trl-policy-critic")
