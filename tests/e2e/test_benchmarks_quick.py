"""``ray-rlhf bench --config tiny --quick --sweep generators.num=1,2`` end to end, run from a
directory outside the source tree (the benchmark ships in the package): the outputs exist and are
well formed.

Checks structure and sanity (keys present, numbers finite, positive where a time or a rate must
be), never the timings themselves: on shared CPUs those are noise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cache = tmp_path_factory.getbasetemp() / "models"
    cwd = tmp_path_factory.mktemp("elsewhere")  # not the checkout: nothing may come from benchmarks/
    cli = Path(sys.executable).parent / "ray-rlhf"
    proc = subprocess.run(
        [str(cli), "bench", "--config", "tiny", "--quick", "--sweep", "generators.num=1,2", "--out", str(out),
         "--cache-dir", str(cache)],
        cwd=cwd, capture_output=True, text=True, timeout=840,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out, json.loads((out / "results.json").read_text())


def test_end_to_end_section(quick_results):
    _, res = quick_results
    assert res["mode"] == "quick" and res["config"]["preset"] == "tiny" and res["config"]["config"] == "tiny"
    mean = res["endtoend"]["mean"]
    for key in ("generate", "reward", "prepare", "update", "sync", "step", "samples_per_s", "generated_tokens_per_s"):
        assert _positive(mean[key]), key
    assert _finite(mean["orchestration"])
    steps = res["endtoend"]["per_step"]
    assert len(steps) == res["config"]["steps"] >= 2
    for row in steps:  # the phases plus orchestration add up to the step, by definition
        parts = sum(row[k] for k in ("generate", "reward", "prepare", "update", "sync", "orchestration"))
        assert parts == pytest.approx(row["step"], rel=1e-9)


def test_bound_and_generation_sections(quick_results):
    _, res = quick_results
    b = res["bound"]
    for key in ("G", "R", "T", "S", "sum", "step_seconds", "efficiency", "copy_bandwidth_bytes_per_s",
                "weight_bytes", "overlap_bound"):
        assert _positive(b[key]), key
    assert b["sum"] == pytest.approx(b["G"] + b["R"] + b["T"] + b["S"])
    assert b["efficiency"] == pytest.approx(b["sum"] / b["step_seconds"])
    g = res["generation"]
    for key in ("in_loop_tokens_per_s", "standalone_vllm_tokens_per_s", "hf_generate_tokens_per_s",
                "in_loop_over_standalone", "vllm_over_hf"):
        assert _positive(g[key]), key


def test_weight_sync_and_memory_sections(quick_results):
    _, res = quick_results
    rows = res["weight_sync"]
    assert {(r["backend"], r["generators"]) for r in rows} >= {
        ("object_store", 1), ("object_store", 2), ("collective", 1), ("collective", 2)}
    for r in rows:
        assert _positive(r["seconds"]) and _positive(r["bytes"]) and _positive(r["params"])
    actors = {m["actor"] for m in res["memory"]}
    assert {"learner", "reward", "generator-0", "generator-1"} <= actors
    assert all(_positive(m["peak_rss_bytes"]) for m in res["memory"])


def test_targets_markdown_and_plots(quick_results):
    out, res = quick_results
    assert len(res["targets"]) >= 7  # generation, efficiency, sync, MFU, reward, outside, vLLM/HF
    for t in res["targets"]:
        assert _finite(t["value"]) and _finite(t["margin"]) and isinstance(t["met"], bool)
        assert t["met"] or t["why"], f"missed target without a reason: {t['name']}"
    md = (out / "results.md").read_text()
    for heading in ("## End to end", "## Bound", "## Generation", "## Weight sync", "## Learner FLOPs and MFU",
                    "## Sweep of `generators.num`", "## Peak memory", "## Targets"):
        assert heading in md
    assert md.count("|---|") >= 8  # one Markdown table per section
    assert res["plots"]
    for name in res["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_mfu_section(quick_results):
    _, res = quick_results
    mfu = res["mfu"]
    assert _positive(mfu["peaks"]["float32"]) and mfu["threads"] >= 1 and mfu["gemm_tokens"] >= 1
    for phase in ("prepare", "update"):
        p = mfu["phases"][phase]
        assert _positive(p["flops_per_step"]) and _positive(p["seconds_per_step"])
        assert p["mfu"] == pytest.approx(p["flops_per_s"] / mfu["peaks"]["float32"])
        assert 0 < p["mfu"] < 2  # a utilisation, not a unit error (FLOPs vs GFLOPs, per step vs per run)
    # gae with the value head on the trunk: prepare = policy + reference forward, update = epochs x 3 forwards
    fwd = mfu["phases"]["prepare"]["flops_per_step"] / 2
    assert mfu["phases"]["update"]["flops_per_step"] == pytest.approx(2 * 3 * fwd)  # tiny: 2 epochs
    assert mfu["padded_over_real_tokens"] >= 1.0


def test_sweep_section(quick_results):
    _, res = quick_results
    sw = res["sweep"]
    assert sw["key"] == "generators.num" and [r["value"] for r in sw["rows"]] == ["1", "2"]
    for r in sw["rows"]:
        assert _positive(r["samples_per_s"]) and _positive(r["step"]) and _positive(r["speedup"])
    assert sw["rows"][0]["speedup"] == 1.0
