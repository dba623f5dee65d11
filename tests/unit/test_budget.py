"""The per-GPU memory budget of ``placement=colocated`` (:mod:`ray_rlhf.budget`), computed by hand."""

from __future__ import annotations

import pytest

from ray_rlhf.budget import CONTEXT_BYTES, GIB, GpuBudget, activation_bytes, learner_memory

P = 2**28
"""Parameters: 4 bytes each is exactly 1 GiB."""


def test_activation_allowance_by_hand():
    # 1024 tokens, h=1024, 16 layers, V=32768, float32 (4 bytes: twice the 2-byte formula):
    #   34 h * 2 = 68 KiB per token per layer -> 68 KiB * 16 * 1024 = 1088 MiB = 1.0625 GiB
    #   logits + log-softmax: 1024 * 32768 * 8 bytes = 256 MiB = 0.25 GiB
    assert activation_bytes(1024, 1024, 16, 32768, compute_bytes=4) == pytest.approx(1.3125 * GIB)
    # bf16: half the body, same float32 logits: 0.53125 + 0.25
    assert activation_bytes(1024, 1024, 16, 32768, compute_bytes=2) == pytest.approx(0.78125 * GIB)
    # checkpointed, float32: 2 h * 2 per layer (4 KiB * 16 * 1024 = 64 MiB) + one full layer (68 MiB)
    #   + 256 MiB logits = 388 MiB
    assert activation_bytes(1024, 1024, 16, 32768, compute_bytes=4, checkpointing=True) == pytest.approx(388 * 2**20)


def test_learner_memory_by_hand_ddp_fsdp_and_sharded_reference():
    one = learner_memory(P, activations=0.5 * GIB)  # weights 1 + grads 1 + AdamW 2 + reference 1 + acts 0.5
    assert (one.weights, one.grads, one.optimizer, one.reference) == (GIB, GIB, 2 * GIB, GIB)
    assert one.total == 5.5 * GIB and one.resident == 2 * GIB
    ddp = learner_memory(P, ranks=4)  # ddp: every rank holds it all
    assert ddp.total == 5 * GIB
    fsdp = learner_memory(P, ranks=4, fsdp=True)  # states / 4, reference whole
    assert (fsdp.weights, fsdp.optimizer, fsdp.reference) == (GIB / 4, GIB / 2, GIB)
    assert learner_memory(P, ranks=4, fsdp=True, shard_reference=True).reference == GIB / 4


def test_the_two_phases_and_where_it_stops_fitting():
    lm = learner_memory(P, activations=1.3125 * GIB)  # total 6.3125 GiB, resident 2 GiB
    ctx = 2 * CONTEXT_BYTES / GIB  # 2 GiB: the engine's and the rank's CUDA contexts
    b = GpuBudget(gpu=16 * GIB, learner=lm, engine_share=0.5 * 16 * GIB, engine_weights=GIB)
    # generating: share 8 + resident 2 + contexts 2 = 12; training: 6.3125 + asleep 0 + 2 = 8.3125
    assert b.generating == (8 + 2 + ctx) * GIB and b.training == (6.3125 + ctx) * GIB and b.fits
    # 8 GiB: generating 4 + 2 + 2 = 8 <= 8 fits; training 8.3125 > 8 does not
    assert not GpuBudget(gpu=8 * GIB, learner=lm, engine_share=4 * GIB, engine_weights=GIB).fits
    # 9 GiB fits (4.5 + 4 = 8.5; 8.3125); without sleep mode training adds the whole share: 12.8125
    assert GpuBudget(gpu=9 * GIB, learner=lm, engine_share=4.5 * GIB, engine_weights=GIB).fits
    awake = GpuBudget(gpu=9 * GIB, learner=lm, engine_share=4.5 * GIB, engine_weights=GIB, engine_sleeps=False)
    assert awake.training == (6.3125 + 4.5 + ctx) * GIB and not awake.fits
    # the engine's weights must fit in its share
    assert not GpuBudget(gpu=80 * GIB, learner=lm, engine_share=0.5 * GIB, engine_weights=GIB).fits


def test_the_line_names_every_term():
    b = GpuBudget(gpu=8 * GIB, learner=learner_memory(P, activations=0.25 * GIB), engine_share=4 * GIB,
                  engine_weights=GIB)
    line = b.line()
    assert "\n" not in line
    for part in ("per GPU of 8.00 GiB", "training 7.25 GiB", "weights 1.00", "grads 1.00", "AdamW 2.00",
                 "reference 1.00", "activations 0.25", "generating 8.00 GiB", "engine share 4.00"):
        assert part in line, part
