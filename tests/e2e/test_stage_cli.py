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
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_stage_input_is_one_line_exit_2(case, tiny_policy_path, tmp_path):
    stage, rows, extra, match = CASES[case]
    data = jsonl(tmp_path / "d.jsonl", rows)
    proc = run(stage, [f"model_path={tiny_policy_path}", f"data.path={data}", f"out={tmp_path / 'out'}", *extra], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert match in last


def test_rm_through_the_cli_writes_a_sequence_classifier(tiny_policy_path, tmp_path):
    from ray_rlhf.data.make_preferences import write

    _, prefs = write(tmp_path / "data", num=16)
    out = tmp_path / "rm"
    proc = run("rm", [f"model_path={tiny_policy_path}", f"data.path={prefs}", f"out={out}", "steps=2", "batch_size=8"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rm step 2/2" in proc.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification")
