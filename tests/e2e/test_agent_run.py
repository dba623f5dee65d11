"""A multi-turn run through the front door: ``python -m ray_rlhf.train --config tiny
env.name=ray_rlhf.envs.letters:LetterGame env.max_turns=2 reward.functions=[] ...`` as a subprocess
with real Ray and vLLM (two generators), the reward coming only from the environment.

One run (~1.5 min here), checked by several tests: the rollout log's multi-turn columns (every
row: two model turns, the observation between them masked out, the environment's per-turn rewards
on each turn's last model token), the ``env/*`` metrics, and that the environment's reward rises
(the learner trains on the per-turn rewards with GAE over the model's tokens only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

STEPS = 16


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory, tiny_policy_path):
    out = tmp_path_factory.mktemp("agent")
    cmd = [sys.executable, "-m", "ray_rlhf.train", "--config", "tiny", "env.name=ray_rlhf.envs.letters:LetterGame",
           "env.max_turns=2", "reward.functions=[]", f"steps={STEPS}", "rollout.prompts_per_step=8",
           "rollout.samples_per_prompt=4", "rollout.max_new_tokens=12", "rollout.max_total_tokens=128",
           "ppo.minibatch_size=32", "ppo.micro_batch_size=32", "ppo.lr=0.003", "generators.shard_prompts=2", "checkpoint.every=100",
           "logging.progress_bar=false", "logging.tensorboard=false", "ray.num_cpus=2", f"output_dir={out}",
           f"model.cache_dir={tiny_policy_path.parent}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, metrics


def test_the_rollout_log_holds_whole_trajectories(agent_run):
    import pyarrow.parquet as pq

    from ray_rlhf.records import rollout_batch_from_arrow

    out, _ = agent_run
    table = pq.read_table(out / "rollouts")
    assert {"loss_mask", "token_reward"} <= set(table.column_names)
    batch = rollout_batch_from_arrow(table)
    assert len(batch) == STEPS * 32
    assert (batch.turn_count == 2).all()  # LetterGame(turns=2) with env.max_turns=2
    assert set(batch.finish_reason.tolist()) <= {"stop", "length"}
    mask, rew, off = batch.loss_mask, batch.token_reward, batch.response_offsets
    for i in range(len(batch)):
        m, r = mask[off[i]:off[i + 1]], rew[off[i]:off[i + 1]]
        ends = np.flatnonzero(m[:-1] & (1 - m[1:])).tolist() + [len(m) - 1]  # last token of each model turn
        assert m[-1] == 1 and len(ends) == 2
        assert np.flatnonzero(r).tolist() == [e for e in ends if r[e] != 0]  # rewards only on turn ends
        assert (batch.sampler_logprobs[off[i]:off[i + 1]][m == 0] == 0).all()
        assert (batch.sampler_logprobs[off[i]:off[i + 1]][m == 1] < 0).all()
    assert "\nuser: Use the letter " in batch.response[0]  # the observation, as the model read it
    assert (batch.reward == 0).all()  # reward.functions=[]: the environment's rewards are per turn


def test_env_metrics_every_step(agent_run):
    out, metrics = agent_run
    assert len(metrics) == STEPS
    for row in metrics:
        assert row["env/turns_mean"] == 2.0 and row["env/errors"] == 0 and row["env/tool_calls"] == 0
        assert row["env/observation_tokens"] > 0 and row["env/seconds"] >= 0
        assert 0 < row["env/reward_mean"] < 2


def test_the_environment_reward_rises(agent_run):
    _, metrics = agent_run
    r = [row["env/reward_mean"] for row in metrics]
    print(f"\nLetterGame env/reward_mean per step: {[round(x, 3) for x in r]}")
    assert np.mean(r[-8:]) > np.mean(r[:4]) + 0.02, r  # measured: 0.127 -> 0.160 (AMD EPYC)
