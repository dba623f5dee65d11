"""LoRA (rank 8) learns the demo task through the whole loop and the real command line.

``python -m ray_rlhf.train --config tiny lora.rank=8 lora.sync=adapter ...`` as a subprocess: 2 vLLM
generators serving the adapters through vLLM's LoRA support, the adapter sync verified after every
step (``sync.verify`` is on: a sync whose adapter folder differs from the learner's adapters, or whose
engine probe log-probs differ from the learner's, fails the run), the letter-frequency reward. The
mean reward of the last steps must be above the first steps', the sampler and the learner must agree
on the log-probs (the generators computed with the learner's adapters) and every sync must have
moved the adapters only. (The merged sync runs through a real engine in test_lora_sync.py.) Then the
run's last checkpoint goes through ``ray-rlhf export`` (merged, and adapters only). Numbers measured
are in docs/lora.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

STEPS = 16
OVERRIDES = ["lora.rank=8", "lora.alpha=32", "lora.sync=adapter", "algo.estimator=grpo", "ppo.lr=0.02",
             "ppo.old_logprobs=recompute", f"steps={STEPS}",
             f"checkpoint.every={STEPS}", "logging.progress_bar=false", "logging.tensorboard=false", "logging.rollouts=false",
             "ray.num_cpus=2"]


@pytest.mark.timeout(300)
def test_lora_rank_8_learns_the_demo_task(tmp_path, models_dir, tiny_policy_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ray_rlhf.train", "--config", "tiny", *OVERRIDES, f"output_dir={out}",
           f"model.cache_dir={models_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    rewards = [r["reward/mean"] for r in rows]
    first, last = statistics.mean(rewards[:4]), statistics.mean(rewards[-4:])
    worst_diff = max(r["ppo/sampler_logprob_diff"] for r in rows)
    print(f"\nLoRA rank 8: reward/mean {first:.3f} (first 4 steps) -> {last:.3f} (last 4); "
          f"max ppo/sampler_logprob_diff {worst_diff:.1e}; kl_ref at the end {rows[-1]['ppo/kl_ref']:.2f}")
    assert last > first + 0.01
    assert worst_diff < 1e-4  # the engines sampled from the learner's adapters
    # adapter sync: 2 layers x 7 projections x (A (8, in) + B (out, 8)) fp32 = 311,296 bytes, not 7.3 MB
    assert {r["sync/bytes"] for r in rows} == {311296}
    assert all(r["sync/verified"] == 1.0 and r["sync/probe_logprob_diff"] < 1e-4 for r in rows)

    # The run's checkpoint through the front door: `ray-rlhf export --merge` writes a model that
    # transformers loads and that computes what base + the exported adapters compute.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    for extra, target in ((["--merge"], merged_dir), ([], adapter_dir)):
        exp = subprocess.run([sys.executable, "-m", "ray_rlhf", "export", *extra, str(out), str(target)],
                             capture_output=True, text=True, timeout=120)
        assert exp.returncode == 0, exp.stderr[-2000:]
        assert f"of step {STEPS} to {target}" in exp.stdout
    assert (merged_dir / "config.json").is_file() and (merged_dir / "tokenizer_config.json").is_file()
    assert (adapter_dir / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_path, dtype=torch.float32).eval()
    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        assert (merged(ids).logits - adapted(ids).logits).abs().max() < 1e-4
        assert (merged(ids).logits - base_logits).abs().max() > 1e-3  # the training is in it
    again = subprocess.run([sys.executable, "-m", "ray_rlhf", "export", str(out), str(adapter_dir)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not an empty directory" in again.stderr
