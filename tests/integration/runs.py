"""The tiny run several integration tests compare against (resume, two learner ranks, S3
checkpoints): one configuration, run once per session by the ``uninterrupted`` fixture."""

from __future__ import annotations

import json
from pathlib import Path

STEPS = 4
OVERRIDES = [
    f"steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.resume=auto",
    "rollout.prompts_per_step=8", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16",
    "generators.shard_prompts=2", "ppo.minibatch_size=8", "ppo.micro_batch_size=4",
    "kl.adaptive=true", "logging.progress_bar=false", "logging.tensorboard=false", "ray.num_cpus=2",
]
"""Two generators pulling shards of 2 prompts from the work queue (so which generator serves which
prompts varies from run to run), two minibatches of two micro-batches, an adaptive KL controller."""


def run_tiny(out: Path, cache: Path, *extra: str) -> list[dict]:
    import ray

    from ray_rlhf.config import load_config
    from ray_rlhf.run.driver import run

    cfg = load_config("tiny", [*OVERRIDES, f"output_dir={out}", f"model.cache_dir={cache}", *extra])
    try:
        run(cfg)
    finally:
        ray.shutdown()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
