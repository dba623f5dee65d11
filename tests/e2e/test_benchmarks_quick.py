"""``ray-rlhf bench --config tiny --quick --steps 2 --sweep generators.num=1,2`` end to end, run from a
directory outside the source tree (the benchmark ships in the package): the outputs exist and are
well formed.

Checks structure and sanity (keys present, numbers finite, positive where a time or a rate must
be), never the timings themselves: on shared CPUs those are noise. What is derived from them is
recomputed here from what the report itself lists: the bound from the per-step phase times, the
learner's model FLOPs from each step's token counts and a hand count of the tiny model's FLOPs.
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
        [str(cli), "bench", "--config", "tiny", "--quick", "--steps", "2", "--sweep", "generators.num=1,2", "--out", str(out),
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


def _mean_after_warmup(xs: list[float]) -> float:
    """The benchmark's averaging, written out: step 1 (the warm-up) left out."""
    kept = xs[1:]
    return sum(kept) / len(kept)


def test_bound_and_generation_sections(quick_results):
    """The bound's parts recomputed from the per-step phase times the report lists: G, R and T are
    warm-up-skipped means of each step's standalone generate, reward and learner (prepare +
    update) seconds; S is one copy of the weights (float32: 4 bytes per parameter) at the
    measured copy bandwidth; the efficiency compares their sum with the end-to-end step."""
    _, res = quick_results
    b = res["bound"]
    assert res["config"]["warmup_steps_skipped"] == 1
    rows = b["per_step"]
    learned = [r for r in rows if "T_prepare" in r]
    assert len(rows) == res["config"]["steps"] and len(learned) >= 2
    G = _mean_after_warmup([r["G"] for r in rows])
    R = _mean_after_warmup([r["R"] for r in rows])
    T = _mean_after_warmup([r["T_prepare"] + r["T_update"] for r in learned])
    assert b["weight_bytes"] == 4 * res["model_params"]  # the tiny model: float32, no tied tensors
    S = b["weight_bytes"] / b["copy_bandwidth_bytes_per_s"]
    step = _mean_after_warmup([r["step"] for r in res["endtoend"]["per_step"]])
    for key, value in {"G": G, "R": R, "T": T, "S": S, "sum": G + R + T + S, "step_seconds": step,
                       "efficiency": (G + R + T + S) / step, "overlap_bound": max(G, T)}.items():
        assert _positive(value) and b[key] == pytest.approx(value, rel=1e-9), (key, b[key], value)
    g = res["generation"]
    for key in ("in_loop_tokens_per_s", "standalone_vllm_tokens_per_s", "hf_generate_tokens_per_s",
                "in_loop_over_standalone", "vllm_over_hf"):
        assert _positive(g[key]), key
    # equal work: a synchronous run's standalone steps after the first replay the loop's weights
    assert [r["loop_weights"] for r in rows] == [False] + [True] * (len(rows) - 1)
    assert g["same_weights_steps"] == g["compared_steps"] == len(rows) - 1


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


# The tiny model's forward FLOPs, by hand (a Llama: hidden d = 256, 2 layers, 4 query heads and 2
# key/value heads of 64, gated MLP of 768, vocabulary 512; checked against its config.json):
#   per token and layer: q 2*256*256 + k, v 2*256*(2*64)*2 + o 2*256*256 = 393_216
#                        MLP (gate, up, down) 3 * 2*256*768             = 1_179_648
#   per token, 2 layers: 2 * (393_216 + 1_179_648)                      = 3_145_728
#   LM head, per scored (response) token: 2*256*512                     = 262_144
#   attention, per sequence of L tokens: 2 layers * (QK^T + AV = 2 * 2*L^2*256) / 2 (causal half) = 1024 L^2
TINY = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "intermediate_size": 768, "vocab_size": 512, "model_type": "llama"}
LINEAR_PER_TOKEN, HEAD_PER_TOKEN, ATTENTION_PER_L2 = 3_145_728, 262_144, 1024
LONGEST = 48 + 24  # the tiny preset's data.max_prompt_tokens + rollout.max_new_tokens
EPOCHS = 2  # the tiny preset's ppo.epochs


def test_mfu_section(quick_results, tiny_policy_path):
    """Each learned step's model FLOPs against the hand count above, from the token counts the
    report lists: a step's sequences have sum_i L_i = real tokens / epochs (the update counts each
    sequence once per epoch) and ``tokens`` response tokens. The attention term needs sum_i L_i^2,
    which lies between (sum_i L_i)^2 / n (equal lengths) and LONGEST * sum_i L_i. ``prepare`` is
    two forwards (the reference, and the policy for pi_old and the values on its trunk); the
    update is two epochs of a forward and a backward (twice a forward)."""
    _, res = quick_results
    config = json.loads((Path(tiny_policy_path) / "config.json").read_text())
    assert {k: config[k] for k in TINY} == TINY and not config["tie_word_embeddings"]
    assert res["config"]["max_new_tokens"] == 24 and res["config"]["estimator"] == "gae"
    mfu = res["mfu"]
    learned = [r for r in res["bound"]["per_step"] if "flops_update" in r]
    assert len(learned) >= 2
    for r in learned:
        n, response = r["sequences"], r["tokens"]
        total = r["real_tokens"] / EPOCHS
        assert total == int(total) and response < total <= LONGEST * n
        linear = LINEAR_PER_TOKEN * total + HEAD_PER_TOKEN * response
        low, high = linear + ATTENTION_PER_L2 * total**2 / n, linear + ATTENTION_PER_L2 * LONGEST * total
        assert low <= r["flops_prepare"] / 2 <= high, (r, low, high)
        assert low <= r["flops_update"] / (EPOCHS * 3) <= high, (r, low, high)
    assert _positive(mfu["peaks"]["float32"]) and mfu["threads"] >= 1 and mfu["gemm_tokens"] >= 1
    for phase in ("prepare", "update"):
        p = mfu["phases"][phase]
        flops = _mean_after_warmup([r[f"flops_{phase}"] for r in learned])
        seconds = _mean_after_warmup([r[f"T_{phase}"] for r in learned])
        assert p["flops_per_step"] == pytest.approx(flops) and p["seconds_per_step"] == pytest.approx(seconds)
        assert p["mfu"] == pytest.approx(flops / seconds / mfu["peaks"]["float32"])
        assert 0 < p["mfu"] < 2  # a utilisation, not a unit error (FLOPs vs GFLOPs, per step vs per run)
    assert mfu["padded_over_real_tokens"] >= 1.0


def test_sweep_section(quick_results):
    _, res = quick_results
    sw = res["sweep"]
    assert sw["key"] == "generators.num" and [r["value"] for r in sw["rows"]] == ["1", "2"]
    for r in sw["rows"]:
        assert _positive(r["samples_per_s"]) and _positive(r["step"]) and _positive(r["speedup"])
    assert sw["rows"][0]["speedup"] == 1.0
    # generators.num=2 is the tiny preset's own value: that row is the end-to-end section's run, not a rerun
    assert sw["rows"][1]["samples_per_s"] == res["endtoend"]["mean"]["samples_per_s"]
    assert sw["rows"][0]["samples_per_s"] != res["endtoend"]["mean"]["samples_per_s"]
