"""GPU-only checks (skipped on machines without CUDA): the same code paths as the CPU tests, with
vLLM's CUDA build, a learner on ``cuda`` and the NCCL collective broadcast."""

from __future__ import annotations

import json

import pytest
import ray

from ray_rlhf.config import load_config
from ray_rlhf.run.driver import run

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_training_on_gpu_with_nccl_broadcast(tmp_path, tiny_policy_path):
    cfg = load_config("tiny", [
        f"output_dir={tmp_path}", f"model.cache_dir={tiny_policy_path.parent}", "logging.progress_bar=false",
        "steps=2", "generators.num=1", "generators.num_gpus=0.5", "generators.gpu_memory_utilization=0.3",
        "learner.device=cuda", "learner.num_gpus=0.5", "sync.backend=collective",
        "rollout.prompts_per_step=8", "ppo.minibatch_size=32",
    ])
    try:
        out = run(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sync/verified"] for r in rows] == [1.0, 1.0]
    assert all(r["ppo/sampler_logprob_diff"] < 1e-2 for r in rows)
