"""The benchmark's FLOP accounting (hand-computed and against torch's FLOP counter), its MFU
summary and the ``--sweep`` argument."""

from __future__ import annotations

import math

import pytest
import torch

from ray_rlhf.bench.args import parse_sweep
from ray_rlhf.bench.flops import Shape, matmul_peak, mfu_summary, step_flops
from ray_rlhf.errors import UserError

SMALL = Shape(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, gated=True)


def test_forward_flops_by_hand():
    # L = 3 + 2 = 5 tokens, logits at the 2 response positions:
    # projections 2*5*4*(2*2 + 2*1*2) + 2*5*(2*2)*4 = 320 + 160 = 480
    # attention   2*5*5*2*2 = 200 (QK^T and AV over the causal half)
    # MLP         2*5*4*8*3 = 960 (gated: gate, up, down)
    # LM head     2*2*4*10  = 160
    assert SMALL.forward_flops(3, 2) == 480 + 200 + 960 + 160


def test_step_flops_counts_passes():
    fwd = SMALL.forward_flops(3, 2) + SMALL.forward_flops(1, 4)
    with_policy = step_flops(SMALL, [3, 1], [2, 4], epochs=2, policy_forward_in_prepare=True)
    reference_only = step_flops(SMALL, [3, 1], [2, 4], epochs=2, policy_forward_in_prepare=False)
    assert with_policy == {"prepare": 2 * fwd, "update": 2 * 3 * fwd, "forward": fwd}
    assert reference_only["prepare"] == fwd and reference_only["update"] == 6 * fwd


def test_shape_of_hf_configs():
    from transformers import GPT2Config, LlamaConfig

    s = Shape.of(LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, vocab_size=300))
    assert s == Shape(64, 3, 4, 2, 16, 96, 300, True)
    g = Shape.of(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    assert (g.intermediate, g.gated, g.kv_heads, g.head_dim) == (128, False, 4, 8)


def test_forward_flops_match_torch_flop_counter_on_a_real_llama():
    """A slow reference: torch counts every matmul of a real forward. It computes logits at every
    position and the full (not causal-half) attention square, so those two terms are adjusted."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=128, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    L = 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 128, (1, L)))
    shape = Shape.of(cfg)
    full_attention = shape.layers * 2 * L * L * shape.heads * shape.head_dim  # the other (masked) half
    assert counter.get_total_flops() == shape.forward_flops(0, L) + full_attention


def test_mfu_summary_by_hand():
    rows = [  # the first learned step is the warm-up and is left out
        {"T_prepare": 9.0, "T_update": 9.0, "flops_prepare": 1.0, "flops_update": 1.0, "padded_tokens": 1, "real_tokens": 1},
        {"T_prepare": 1.0, "T_update": 3.0, "flops_prepare": 10.0, "flops_update": 30.0, "padded_tokens": 12,
         "real_tokens": 10},
        {"T_prepare": 1.0, "T_update": 1.0, "flops_prepare": 10.0, "flops_update": 10.0, "padded_tokens": 10,
         "real_tokens": 10},
        {"G": 1.0},  # a step the learner did not take
    ]
    out = mfu_summary(rows, {"float32": 20.0}, threads=2, gemm_tokens=64)
    assert out["phases"]["prepare"] == {"flops_per_step": 10.0, "seconds_per_step": 1.0, "flops_per_s": 10.0, "mfu": 0.5}
    assert out["phases"]["update"]["mfu"] == pytest.approx(40 / 4 / 20)
    assert out["learner_flops_per_step"] == 30.0
    assert out["learner_mfu"] == pytest.approx(60 / 6 / 20)
    assert out["padded_over_real_tokens"] == pytest.approx(22 / 20)


def test_matmul_peak_is_a_rate():
    peak = matmul_peak(SMALL, tokens=8, threads=1, repeats=2)
    assert math.isfinite(peak) and peak > 0
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("text,expected", [
    ("generators.num=1,2,4", ("generators.num", ["1", "2", "4"])),
    (" ppo.micro_batch_tokens = 512, 1024 ", ("ppo.micro_batch_tokens", ["512", "1024"])),
    (None, None),
])
def test_parse_sweep(text, expected):
    assert parse_sweep(text) == expected


@pytest.mark.parametrize("text", ["generators.num", "=1,2", "generators.num=", "generators.num=,"])
def test_parse_sweep_refuses_malformed(text):
    with pytest.raises(UserError, match="KEY=V1,V2"):
        parse_sweep(text)


def test_overlap_section_renders_the_ratios():
    from ray_rlhf.bench.report import _overlap_md

    ov = {"learner_cores": [0], "generator_cores": [1], "G": 2.0, "T": 3.0, "G_plus_T": 5.0, "max_G_T": 3.0,
          "sync": {"step": 5.5, "samples_per_s": 10.0, "generate": 2.0, "learner": 3.0},
          "async": {"step": 3.3, "samples_per_s": 16.0, "generate": 2.1, "learner": 3.0}, "speedup": 5.5 / 3.3}
    md = "\n".join(_overlap_md({"overlap": ov}))
    assert "| synchronous (max_staleness=0) | 5.5 | 10 | 2 | 3 | 1.1 | 1.83 |" in md
    assert "| asynchronous (max_staleness=1) | 3.3 | 16 | 2.1 | 3 | 0.66 | 1.1 |" in md
    assert "speed-up 1.67x (ideal (G+T)/max(G,T) = 1.67x)" in md
    assert _overlap_md({}) == []


def test_split_cores_gives_each_side_its_own():
    from ray_rlhf.bench.overlap import split_cores

    learner, gens = split_cores()
    assert learner and gens and not set(learner) & set(gens)


def test_sweep_row_and_table_carry_learner_memory_and_sync_bytes():
    """``--sweep lora.rank=0,8``: per value, the learner step (prepare + update), the learner's peak
    RSS, the sync's seconds and bytes -- read from the end-to-end section, by hand here."""
    from ray_rlhf.bench import report
    from ray_rlhf.bench.run import SWEEP_MEANS

    def e2e(update, rss_mib, nbytes):
        mean = {k: 1.0 for k in SWEEP_MEANS} | {"prepare": 0.5, "update": update, "sync": 0.1, "samples_per_s": 2.0}
        return {"mean": mean, "weight_bytes": nbytes,
                "memory": [{"actor": "generator-0", "peak_rss_bytes": 9 * 2**30},
                           {"actor": "learner", "peak_rss_bytes": rss_mib * 2**20}]}

    rows = [report.sweep_row("0", e2e(2.0, 900, 7_345_152), SWEEP_MEANS),
            report.sweep_row("8", e2e(1.5, 800, 311_296), SWEEP_MEANS)]
    assert rows[0]["learner_step"] == 2.5 and rows[1]["learner_step"] == 2.0  # 0.5 + update
    assert rows[1]["learner_peak_rss_bytes"] == 800 * 2**20 and rows[1]["sync_bytes"] == 311_296
    for r in rows:
        r["speedup"] = 1.0
    md = "\n".join(report._sweep_md({"sweep": {"key": "lora.rank", "rows": rows}}))
    assert "| lora.rank | samples/s | tokens/s | s/step | generate | learner | learner RSS MiB | sync | sync bytes |" in md
    assert "| 8 | 2 | 1 | 1 | 1 | 2 | 800 | 0.1 | 311,296 | 1 |" in md
