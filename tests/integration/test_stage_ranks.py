"""``python -m ray_rlhf.sft learner.num=2`` (two ranks as Ray actors on a local Ray, gloo; DDP, and
FSDP2 with ``learner.strategy=fsdp``) takes the same steps as one rank in-process: every metric and the held-out loss (a collective
gather over the ranks) to a relative 1e-4, and the final weights to 1% of what the update moved
them (fp32 round-off: the gradient is summed over the ranks in another order, and AdamW divides
by its running RMS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_rlhf.data.make_preferences import write
from ray_rlhf.stages.runner import StageOptions, run_stage

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


COMMON = dict(steps=4, batch_size=8, micro_batch_size=4, lr=1e-3, eval_fraction=0.25, eval_every=2)


@pytest.fixture(scope="module")
def one_rank(tiny_policy_path, tmp_path_factory):
    """(data file, the one-rank run's metrics, its output dir): shared by both strategies."""
    tmp = tmp_path_factory.mktemp("one_rank")
    sft, _ = write(tmp / "data", num=32)
    hist = run_stage(StageOptions(stage="sft", model_path=str(tiny_policy_path), data_path=str(sft),
                                  out=str(tmp / "one"), **COMMON))
    return sft, hist, tmp / "one"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_stage_ranks_through_the_cli_equal_one_rank(strategy, one_rank, tiny_policy_path, tmp_path):
    sft, one, one_dir = one_rank
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "ray_rlhf.sft", f"model.path={tiny_policy_path}", f"data.path={sft}",
         f"output_dir={tmp_path / 'two'}", "steps=4", "optim.batch_size=8", "optim.micro_batch_size=4", "optim.lr=1e-3",
         "data.eval_fraction=0.25", "eval.every=2", "learner.num=2", f"learner.strategy={strategy}"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft step 4/4" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("sft: 2 learner ranks"))
    assert f"({strategy.upper()}, gloo)" in line
    pids = line.split("pids ")[1].split()
    assert len(set(pids)) == 2 and str(os.getpid()) not in pids
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    assert "eval/loss" in two[1]
    for a, b in zip(one, two):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    wa, wb = _weights(one_dir / "model"), _weights(tmp_path / "two" / "model")
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    moved = max(float((wa[k] - v).abs().max()) for k, v in _weights(Path(tiny_policy_path)).items() if k in wa)
    print(f"\n{strategy}: one vs two ranks: max weight difference {diff:.2e} (the update moved weights by up to {moved:.2e})")
    assert moved > 1e-3 and diff < 0.01 * moved  # ddp measured 6.1e-6 vs 4.0e-3 (AMD EPYC)
    # the checkpoint holds whole tensors (FSDP2 gathered them): the final model's, name for name
    ckpt = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(ckpt[f"lm.{k}"], v) for k, v in wb.items() if f"lm.{k}" in ckpt)
    assert sum(f"lm.{k}" in ckpt for k in wb) >= len(wb) - 1  # a tied head may be saved once
