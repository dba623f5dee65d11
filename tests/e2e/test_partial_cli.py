"""The front door of ``rollout.partial=true``: ``ray-rlhf train --config tiny rollout.max_staleness=1
rollout.partial=true`` as a subprocess, stopped after step 1 (``faults.stop``) and re-run with the
same command, which resumes.

Checked on the finished run: metrics rows for steps 1, 2, 3, each once; the per-token staleness
metrics are present and within ``rollout.max_staleness``; in the rollout log every step holds
exactly one completion per (prompt, sample) of the prompt stream, every token's version is at least
its sequence's ``policy_version`` (the version it started with) and at most 1 behind the learner;
the step that was pending at the checkpoint (step 2, generated before the stop) is trained on and
logged exactly as it was stored. Whether a step is interrupted depends on timing (the learner and
the generators share two cores), so the fraction of interrupted sequences is reported, not asserted;
``tests/integration/test_partial.py`` forces an interruption on the real engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from ray_rlhf.data.prompts import PromptStream, bundled_prompts_path, load_prompts
from ray_rlhf.metrics import read_rollouts

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

STEPS, K, PROMPTS, SAMPLES = 3, 1, 16, 4


def test_partial_run_stops_and_resumes_through_the_cli(tmp_path, tiny_policy_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ray_rlhf", "train", "--config", "tiny", f"rollout.max_staleness={K}",
           "rollout.partial=true", f"steps={STEPS}", "faults.stop=[{step: 1}]", "ray.num_cpus=2",
           "logging.progress_bar=false", "logging.tensorboard=false", f"output_dir={out}",
           f"model.cache_dir={tiny_policy_path.parent}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    pending = pq.read_table(out / "checkpoints" / "step_000001" / "pending" / "step_000002.parquet").to_pylist()
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # resumes
    assert second.returncode == 0, second.stderr[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert 0 <= r["rollout/token_staleness_mean"] <= r["rollout/token_staleness_max"] <= K, r
        assert r["rollout/staleness_max"] <= K and 0 <= r["rollout/partial_frac"] <= 1
    print("partial_frac by step:", [r["rollout/partial_frac"] for r in rows],
          "token_staleness_mean:", [round(r["rollout/token_staleness_mean"], 3) for r in rows])

    logged = read_rollouts(out).to_pylist()
    stream = PromptStream(load_prompts(bundled_prompts_path()), seed=0)
    for step in range(1, STEPS + 1):
        want = Counter((p.index, s) for p in stream.next_batch(PROMPTS) for s in range(SAMPLES))
        got = [r for r in logged if r["step"] == step]
        assert Counter((r["prompt_index"], r["sample_index"]) for r in got) == want, f"step {step}"
        for r in got:
            assert len(r["token_versions"]) == len(r["response_ids"]) == len(r["sampler_logprobs"])
            assert all(r["policy_version"] <= v and (step - 1) - v <= K for v in r["token_versions"]), (step, r)

    def by_key(rs):
        return {(r["prompt_index"], r["sample_index"]): (r["response_ids"], r["token_versions"], r["sampler_logprobs"],
                                                         r["reward"]) for r in rs}

    assert by_key([r for r in logged if r["step"] == 2]) == by_key(pending)  # the stored step, trained on as stored
