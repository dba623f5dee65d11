"""GPU-only checks (skipped on machines without CUDA): the same code paths as the CPU tests, with
vLLM's CUDA build, a learner on ``cuda`` and the NCCL collective broadcast.

What a GPU run must get right, and each check's tolerance:

- the learner trains on the GPU and the NCCL broadcast delivers its weights bit for bit: every
  sync verified, and after the last step every engine's read-back checksum equals the learner's
  final weights' (which differ from the initial model's);
- the engine and the learner compute the same distribution: both hold float32 weights and compute
  in float32 (the generators' engine dtype, ``learner.dtype=float32``), so the sampler's log-probs
  of the sampled tokens match the learner's recomputed ones to float32 round-off -- a mean
  absolute difference of 1e-7 on CPU, bounded here by 1e-3 (cuBLAS / attention kernels with other
  reduction orders, TF32 if some library turned it on: ~1e-4). A bf16 path anywhere (weights or
  kernels; bf16 keeps 8 mantissa bits, a relative error of 4e-3 on logits of a few units) shows
  up as ~1e-2;
- step 1 starts from the reference: the policy and the reference are the same weights on the same
  device, so the KL to the reference is 0 up to round-off;
- the rewards are those of the tiny preset's rule (the fraction of 'e' in a response: in [0, 1]),
  and every step's statistics are finite.
"""

from __future__ import annotations

import json
import math

import pytest
import ray

from ray_rlhf.config import load_config
from ray_rlhf.run.driver import run

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

STEPS = 2


def test_training_on_gpu_with_nccl_broadcast(tmp_path, tiny_policy_path):
    from safetensors.torch import load_file

    from ray_rlhf.sync.checksum import state_dict_checksum
    from ray_rlhf.sync.receiver import WeightReceiver
    from ray_rlhf.sync.remote import call

    cfg = load_config("tiny", [
        f"output_dir={tmp_path}", f"model.cache_dir={tiny_policy_path.parent}", "logging.progress_bar=false",
        f"steps={STEPS}", "generators.num=1", "generators.num_gpus=0.5", "generators.gpu_memory_utilization=0.3",
        "learner.device=cuda", "learner.num_gpus=0.5", "learner.dtype=float32", "sync.backend=collective",
        "sync.verify=true", "rollout.prompts_per_step=8", "ppo.minibatch_size=32",
    ])
    final: dict = {}

    def on_finish(actors) -> None:  # the live actors after the last step's sync
        source = actors.learners.source
        final["device"] = ray.get(source.__ray_call__.remote(lambda learner: next(learner.model.parameters()).device.type))
        final["names"] = sorted(ray.get(source.hf_state_dict.remote()))
        final["engines"] = ray.get([call(g, WeightReceiver.engine_checksum) for g in actors.pool.handles.values()])
        final["learner"] = [ray.get(source.weights_checksum.remote(tuple(e.names))) for e in final["engines"]]

    try:
        out = run(cfg, on_finish=on_finish)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))

    # the learner trained on the GPU; the NCCL broadcast delivered exactly its weights
    assert final["device"] == "cuda"
    assert [r["sync/verified"] for r in rows] == [1.0] * STEPS
    assert len(final["engines"]) == 1
    for engine, learner in zip(final["engines"], final["learner"]):
        assert sorted(engine.names) == final["names"] and engine.mismatched == ()
        assert engine.checksum == learner
    initial = state_dict_checksum(load_file(tiny_policy_path / "model.safetensors"))
    assert final["learner"][0] != initial  # the engines hold the trained weights, not the initial model

    # engine and learner agree on the sampled tokens' log-probs (float32 both: see the module doc)
    diffs = [r["ppo/sampler_logprob_diff"] for r in rows]
    print(f"sampler vs learner mean |log-prob difference| by step: {diffs}; KL to the reference "
          f"{[r['ppo/kl_ref'] for r in rows]}")
    assert all(d < 1e-3 for d in diffs), diffs
    assert abs(rows[0]["ppo/kl_ref"]) < 1e-4  # version 0 is the reference

    # sane rewards and statistics
    for r in rows:
        assert 0.0 <= r["reward/mean"] <= 1.0, r["reward/mean"]
        for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/grad_norm", "ppo/kl_ref", "ppo/entropy"):
            assert math.isfinite(r[key]), (r["step"], key, r[key])
        assert r["ppo/optimizer_steps"] >= 1


def test_an_sft_stage_on_the_gpu_in_bf16(tmp_path, tiny_policy_path):
    """``learner.device=cuda learner.dtype=bfloat16`` for a stage: the data and the model on the GPU,
    two SFT steps finite and falling, the saved model float32 and loadable."""
    import torch
    from transformers import AutoModelForCausalLM

    from ray_rlhf.data.make_preferences import write
    from ray_rlhf.stages.runner import StageOptions, run_stage

    sft, _ = write(tmp_path / "data", num=16)
    hist = run_stage(StageOptions(stage="sft", model_path=str(tiny_policy_path), data_path=str(sft),
                                  out=str(tmp_path / "out"), steps=3, batch_size=8, device="cuda", dtype="bfloat16"))
    losses = [h["sft/loss"] for h in hist]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
