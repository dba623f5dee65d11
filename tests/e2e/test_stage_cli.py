"""``python -m ray_rlhf.sft|rm|dpo`` through a subprocess: bad input is one line and exit 2 before
any model loads; a short rm run writes a sequence-classifier directory and metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def run(module, args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"ray_rlhf.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CASES = {
    "pref_missing_chosen": ("dpo", [{"prompt": "x", "rejected": "r"}], [], "has no 'chosen'"),
    "pref_missing_rejected": ("rm", [{"prompt": "x", "chosen": "c"}], [], "has no 'rejected'"),
    "chosen_equals_rejected": ("dpo", [{"prompt": "x", "chosen": "c", "rejected": "c"}], [], "chosen equals rejected"),
    "sft_without_response": ("sft", [{"prompt": "x"}], [], "has no 'response'"),
    "dpo_beta_zero": ("dpo", [{"prompt": "x", "chosen": "c", "rejected": "r"}], ["dpo.beta=0"], "dpo.beta=0"),
    "unknown_key": ("sft", [{"prompt": "x", "response": "y"}], ["bogus=1"], "unknown sft option"),
    "cuda_without_gpu": ("sft", [{"prompt": "x", "response": "y"}], ["learner.device=cuda"], "sees no CUDA GPU"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_stage_input_is_one_line_exit_2(case, tiny_policy_path, tmp_path):
    stage, rows, extra, match = CASES[case]
    if case == "cuda_without_gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    data = jsonl(tmp_path / "d.jsonl", rows)
    proc = run(stage, [f"model_path={tiny_policy_path}", f"data.path={data}", f"out={tmp_path / 'out'}", *extra], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert match in last


@pytest.fixture(scope="module")
def rm_out(tiny_policy_path, tmp_path_factory):
    """``ray-rlhf rm`` (as ``python -m ray_rlhf.rm``) for 2 steps: (process, output directory)."""
    from ray_rlhf.data.make_preferences import write

    tmp = tmp_path_factory.mktemp("rm_cli")
    _, prefs = write(tmp / "data", num=16)
    out = tmp / "rm"
    proc = run("rm", [f"model_path={tiny_policy_path}", f"data.path={prefs}", f"out={out}", "steps=2", "batch_size=8"],
               tmp)
    return proc, out


def test_rm_through_the_cli_writes_a_sequence_classifier(rm_out):
    proc, out = rm_out
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rm step 2/2" in proc.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification")


def test_the_same_command_with_more_steps_resumes_and_keeps_the_metrics(rm_out, tiny_policy_path, tmp_path):
    """``ray-rlhf rm ... steps=3`` on the 2-step run's output: resumes from its checkpoint, takes one
    step, and metrics.jsonl holds rows 1-3 with the first two unchanged."""
    import shutil

    _, out = rm_out
    again = tmp_path / "rm"
    shutil.copytree(out, again)
    before = (again / "metrics.jsonl").read_text().splitlines()
    prefs = next(out.parent.glob("data/*prefs*"))
    proc = run("rm", [f"model_path={tiny_policy_path}", f"data.path={prefs}", f"out={again}", "steps=3", "batch_size=8"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rm step 3/3" in proc.stdout and "rm step 1/3" not in proc.stdout
    rows = (again / "metrics.jsonl").read_text().splitlines()
    assert rows[:2] == before and [json.loads(r)["step"] for r in rows] == [1, 2, 3]


def test_the_rm_output_scores_a_ppo_run_through_the_cli(rm_out, tiny_policy_path, tmp_path):
    """The round trip: ``ray-rlhf rm`` then ``ray-rlhf train reward.model_path=<its model>`` (real
    Ray and vLLM): preflight accepts the directory and the reward actor scores with it."""
    proc, out = rm_out
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "ppo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    train = subprocess.run(
        [sys.executable, "-m", "ray_rlhf.train", "--config", "tiny", "steps=1", f"output_dir={run_dir}",
         f"model.cache_dir={Path(tiny_policy_path).parent}", f"reward.model_path={out / 'model'}", "reward.functions=[]",
         "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8",
         "generators.num=1", "generators.shard_prompts=4", "ppo.minibatch_size=8", "ppo.micro_batch_size=8",
         "logging.progress_bar=false", "logging.tensorboard=false", "ray.num_cpus=2"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["reward/mean"] == rows[0]["reward/mean"]  # scored by the trained model: a number, not NaN
