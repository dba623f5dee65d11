"""``ray start --head`` on 127.0.0.1, ``ray job submit --working-dir . -- python -m ray_rlhf.train`` (then
``python -m ray_rlhf.sft``), ``ray stop``.

The way users run on clusters, on one machine: the job's driver joins the running cluster through
``RAY_ADDRESS`` (set by the job supervisor) instead of starting its own Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """``ray job submit ...``; retried (up to 5 times, 10 s apart) while the new head's job agent is
    not up yet ("No available agent to submit job": the dashboard answers before its agent on a
    loaded machine)."""
    for _ in range(5):
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(10)
    return proc


def test_ray_job_submit_runs_training(tmp_path, tiny_policy_path):
    bin_dir = Path(sys.executable).parent
    ray_cli = str(bin_dir / "ray")
    # A fresh environment for the cluster and the client alike: no RAY_ADDRESS, and Ray's default
    # token authentication (an in-process ray.init earlier in this pytest process may have left
    # its own RAY_AUTH_* settings in os.environ).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    # A token of the test's own, so that the test does not depend on ~/.ray/auth_token left by an
    # earlier Ray start (a fresh machine has none).
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    gcs, dash = free_port(), free_port()
    start = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    out = tmp_path / "run"
    try:
        job = submit(
            [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir=.",
             "--runtime-env=clusters/runtime_env.yaml", "--",
             "python", "-m", "ray_rlhf.train", "--config", "tiny", "steps=2", f"output_dir={out}",
             f"model.cache_dir={Path(tiny_policy_path).parent}", "logging.progress_bar=false",
             "rollout.prompts_per_step=8", "ppo.minibatch_size=32"],
            env, 900,
        )
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in job.stdout, job.stdout[-2000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(r["sync/verified"] == 1.0 for r in rows)
        # A pipeline stage through the same entry point: `python -m ray_rlhf.sft` on the cluster.
        sft_out = tmp_path / "sft"
        sft = submit(
            [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir=.",
             "--runtime-env=clusters/runtime_env.yaml", "--",
             "python", "-m", "ray_rlhf.sft", f"model_path={tiny_policy_path}",
             "data.path=ray_rlhf/data/bundled/sft_letters.jsonl", f"out={sft_out}", "steps=2",
             "batch_size=4", "micro_batch_size=4"],
            env, 600,
        )
        assert sft.returncode == 0, (sft.stdout + sft.stderr)[-4000:]
        assert "succeeded" in sft.stdout, sft.stdout[-2000:]
        sft_rows = [json.loads(line) for line in (sft_out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in sft_rows] == [1, 2]
        assert (sft_out / "model" / "config.json").is_file()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
