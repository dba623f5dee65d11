"""Real data end to end: a chat dataset whose rows carry the reference the reward checks.

The bundled letters set (``bundled:letters``): each row's ``messages`` ask for a short text with
many of one letter (``e`` or ``a``), and its ``letter`` column names that letter. The prompts go through the
tiny model's chat template; ``letter`` (and ``data_source``) travel with each prompt through
generation to the reward function ``target_letter_frequency(prompt, response, letter)`` and into
the rollout log. The policy, trained with GRPO (the usual estimator for verifiable rewards), must
raise the reward (a real Ray + vLLM run).
"""

from __future__ import annotations

import json
import statistics

import pytest
import ray

from ray_rlhf.config import load_config
from ray_rlhf.metrics import read_rollouts
from ray_rlhf.rewards.verifiable import target_letter_frequency
from ray_rlhf.run.driver import run

pytestmark = pytest.mark.integration

STEPS = 16


def test_letters_chat_run_passes_columns_to_the_reward_and_learns(tmp_path, tiny_policy_path):
    cfg = load_config("tiny", [
        f"output_dir={tmp_path}", f"model.cache_dir={tiny_policy_path.parent}", f"steps={STEPS}", "ray.num_cpus=2",
        "logging.progress_bar=false", "checkpoint.every=0", "data.prompts_path=bundled:letters",
        "data.prompt_column=messages", "data.max_prompt_tokens=72", "generators.max_model_len=128",
        "algo.estimator=grpo",
        "reward.functions=[{name: ray_rlhf.rewards.verifiable:target_letter_frequency}]",
    ])
    try:
        out = run(cfg)
    finally:
        ray.shutdown()
    rows = read_rollouts(out).to_pylist()
    assert {"letter", "data_source"} <= set(rows[0])
    for r in rows[:50]:  # the reward saw the row's own letter, and the prompt went through the template
        assert r["reward"] == pytest.approx(target_letter_frequency(r["prompt"], r["response"], r["letter"]))
        assert r["prompt"].startswith("<s>") and r["prompt"].endswith("assistant:")
        assert f"{r['letter']}" in r["prompt"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward/mean"] for m in metrics]
    first, last = statistics.mean(rewards[:4]), statistics.mean(rewards[-4:])
    print(f"letters chat: reward/mean first 4 steps {first:.3f}, last 4 steps {last:.3f}")
    assert last > first + 0.03, rewards
