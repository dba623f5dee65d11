"""What ``make demo`` shows: the console of a short tiny run, as a user would launch it.

The driver prints the resolved config, the progress bar, one line per checkpoint and the final
paths. vLLM's routine warnings (``RotaryEmbedding: Failed to load weights`` after every weight
reload) and Ray's token-authentication notice go to the run's log files instead -- redirected,
not dropped: the test finds them there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NOISE = re.compile(r"RotaryEmbedding|Failed to load weights|Token authentication|\(raylet\)|\((Generator|Learner|RewardScorer) pid=")


def test_a_short_run_prints_only_what_the_user_needs(tmp_path, tiny_policy_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_RLHF_")) and k not in ("RAY_ADDRESS", "VLLM_LOGGING_LEVEL")}
    proc = subprocess.run(
        [sys.executable, "-m", "ray_rlhf.train", "--config", "tiny", "steps=2", "checkpoint.every=2",
         "rollout.prompts_per_step=8", "ppo.minibatch_size=32", f"output_dir={out}",
         f"model.cache_dir={tiny_policy_path.parent}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    lines = [ln for ln in re.split(r"[\r\n]", console) if ln.strip()]
    noisy = [ln for ln in lines if NOISE.search(ln)]
    assert not noisy, "\n".join(noisy[:20])
    warnings = [ln for ln in lines if re.search(r"\b(WARNING|WARN)\b", ln) and "ray_rlhf" not in ln]
    assert not warnings, "\n".join(warnings[:20])
    assert any("resolved config" in ln for ln in lines)
    assert any(ln.endswith(f"checkpoint written: {out}/checkpoints/step_000002") for ln in lines), console[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"metrics: {out}/metrics.jsonl"), proc.stdout[-2000:]
    # not dropped: the engines' reload warnings are in the workers' log files
    logs = "".join(p.read_text(errors="replace") for p in (out / "logs").glob("worker-*.log"))
    assert "Failed to load weights" in logs
