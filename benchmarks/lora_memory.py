"""The learner's memory with LoRA vs full fine-tuning, on the ``small`` preset (no Ray, no vLLM).

Each mode runs in a fresh Python process (a clean peak RSS): the learner of the ``small`` preset
(``load_config("small")``, its PPO settings) is built, then ``--steps`` PPO steps run on a
synthetic scored batch of the preset's size (random prompt and response tokens of the preset's
lengths; the learner's cost does not depend on the tokens). Reported per mode:

* ``trainable_params`` / ``total_params`` (policy + value head; the reference separately);
* ``reference_params``: the reference's own parameters (0 with LoRA: the base model with the
  adapters disabled);
* ``optimizer_state_bytes``: AdamW's tensors after the steps (two moments per trainable parameter);
* ``peak_rss_mib``: the process's peak resident memory (``ru_maxrss``), import and model load included;
* ``step_seconds``: the mean of the steps after the first.

Usage: ``python benchmarks/lora_memory.py [--steps 3] [--ranks 0,8] [--cache-dir DIR] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def one_mode(rank: int, steps: int, cache_dir: str) -> dict:
    """Build the ``small`` learner with ``lora.rank=rank`` and run ``steps`` steps; the numbers."""
    import resource
    import time

    import numpy as np
    import torch

    from ray_rlhf.config import load_config
    from ray_rlhf.learning.group import learner_kwargs
    from ray_rlhf.learning.learner import Learner
    from ray_rlhf.learning.lora import optimizer_state_bytes
    from ray_rlhf.models.factory import ensure_model
    from ray_rlhf.records import RolloutBatch

    cfg = load_config("small", [f"lora.rank={rank}", f"model.cache_dir={cache_dir}"])
    path = ensure_model("policy", cfg.model.preset, cache_dir, seed=cfg.seed)
    learner = Learner(**learner_kwargs(cfg, path))
    r = cfg.rollout
    n, vocab = r.batch_size, learner.model.lm.config.vocab_size
    g = np.random.default_rng(0)
    prompts = [g.integers(3, vocab, size=int(g.integers(8, cfg.data.max_prompt_tokens))).tolist() for _ in range(n)]
    responses = [g.integers(3, vocab, size=r.max_new_tokens).tolist() for _ in range(n)]
    times = []
    for step in range(steps):
        batch = RolloutBatch.from_sequences(
            prompt_index=[i // r.samples_per_prompt for i in range(n)], sample_index=[i % r.samples_per_prompt for i in range(n)],
            prompt_ids=prompts, response_ids=responses, sampler_logprobs=[[-1.0] * len(x) for x in responses],
            prompt=[""] * n, response=[""] * n, finish_reason=["length"] * n, policy_version=step,
            reward=g.random(n).tolist())
        t0 = time.perf_counter()
        learner.step(batch)
        times.append(time.perf_counter() - t0)
    params = list(learner.model.parameters())
    ref = list(learner.reference.parameters()) if learner.reference is not None else []
    return {
        "lora_rank": rank,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "reference_params": sum(p.numel() for p in ref),
        "optimizer_state_bytes": optimizer_state_bytes(learner.optimizer),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_seconds": sum(times[1:]) / max(1, len(times) - 1),
        "torch_threads": torch.get_num_threads(),
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", default="0,8", help="lora.rank values, comma-separated (0: full fine-tuning)")
    ap.add_argument("--cache-dir", default=None, help="where the small model is built (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one mode
    args = ap.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="lora-memory-")
    if args.one is not None:
        print(json.dumps(one_mode(args.one, args.steps, cache)))
        return
    rows = []
    for rank in [int(x) for x in args.ranks.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(rank), "--steps", str(args.steps), "--cache-dir", cache],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"learner memory, `small` preset, {args.steps} steps, {cpu_name()}")
    print("| lora.rank | trainable params | total params | reference params | AdamW state | peak RSS | step |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['lora_rank']} | {row['trainable_params']:,} | {row['total_params']:,} | {row['reference_params']:,} "
              f"| {row['optimizer_state_bytes'] / 2**20:.1f} MiB | {row['peak_rss_mib']:.0f} MiB | {row['step_seconds']:.1f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
