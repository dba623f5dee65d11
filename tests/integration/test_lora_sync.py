"""LoRA's two syncs (``lora.sync=merged`` and ``adapter``) on a real local Ray with a real vLLM engine.

A LoRA learner actor (rank 8) and one generator: after a LoRA update and a verified publish, the
engine's log-probs of the tokens it samples equal the learner's adapted policy's within the fp32
tolerance, and differ from the base model's (the reference, adapters off): the update reached the
engine. Merged: the engine's read-back checksum equals the learner's merged weights. Adapter: the
engine serves the adapters through vLLM's LoRA support, the bytes sent are the adapters' only, and
deliveries broken on purpose (a reused adapter id, a wrong scaling) fail the verify.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_rlhf.config.schema import KLConfig, PPOConfig
from ray_rlhf.generation.generator import Generator, core_list_for
from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.learning.lora import LoraSpec
from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec
from ray_rlhf.sync.broadcaster import WeightBroadcaster
from ray_rlhf.sync.types import WeightSyncError

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")

PROMPTS = ["The cat", "Water is", "Once upon a time", "Tell me"]


def _policy_and_base_logprobs(learner, rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the adapted policy's, the base model's, the sampler's log-probs, the response mask) of the
    rollouts' tokens, computed in the learner actor. Shapes: (B, T)."""
    def score(self, rollouts):
        b = collate(rollouts, self.pad_id)
        with torch.no_grad():
            policy = self.model(*b.inputs(), with_values=False, with_entropy=False).logprobs
            base = self.reference(*b.inputs())
        return policy, base, b.sampler_logprobs, b.response_mask

    return ray.get(learner.__ray_call__.remote(score, rollouts.with_rewards(np.zeros(len(rollouts.reward)), {})))

def _engine_after_sync(learner, gen, shard, spec) -> tuple[float, float]:
    """Sample ``shard`` at version 1; (max |engine - learner policy|, max |engine - base|) over the
    sampled tokens' log-probs."""
    after = ray.get(gen.generate.options(num_returns=2).remote(shard, spec)[1])
    assert set(after.policy_version.tolist()) == {1}
    policy, base, sampler, mask = _policy_and_base_logprobs(learner, after)
    m = mask.bool()
    return (sampler - policy)[m].abs().max().item(), (sampler - base)[m].abs().max().item()



@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_lora_update_reaches_the_engine_through_the_merged_sync(tiny_policy_path, local_ray):
    ppo = PPOConfig(epochs=2, minibatch_size=8, micro_batch_size=8, lr=2e-2)
    learner = ray.remote(num_cpus=0.5)(Learner).remote(str(tiny_policy_path), ppo, KLConfig(),
                                                      options=LearnerOptions(lora=LoraSpec(rank=8)))
    gen = ray.remote(num_cpus=0.5)(Generator).remote(str(tiny_policy_path), "g0", max_model_len=64,
                                                   omp_threads_bind=core_list_for(0))
    members = {"g0": gen}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    shard = PromptShard(0, tuple(PromptItem(i, t, tuple(tok(t).input_ids)) for i, t in enumerate(PROMPTS)))
    spec = SamplingSpec(n=2, max_new_tokens=8, seed=3)

    broadcaster = WeightBroadcaster(learner, "object_store", verify=True)
    broadcaster.join(members)  # version 0: the merged export of B = 0 is the base model, read back in full
    before = ray.get(gen.generate.options(num_returns=2).remote(shard, spec)[1])
    ray.get(learner.step.remote(before.with_rewards(np.arange(len(before.reward)) % 2.0, {})))

    res = broadcaster.publish(1, members)  # verify on: the engine's read-back equals the merged weights
    merged = ray.get(learner.hf_state_dict.remote())
    assert not any(".lora_" in k or ".base_layer" in k or k.startswith("base_model") for k in merged)
    assert res.bytes == sum(t.numel() * 4 for t in merged.values())  # the full (merged) state dict

    engine_vs_policy, engine_vs_base = _engine_after_sync(learner, gen, shard, spec)
    print(f"\nLoRA merged sync: {res.bytes} bytes in {res.seconds * 1e3:.1f} ms; max |engine - learner| "
          f"log-prob {engine_vs_policy:.2e}, max |engine - base| {engine_vs_base:.2e}")
    assert engine_vs_policy < 1e-4
    assert engine_vs_base > 1e-2  # the engine computes with the update, not the base weights
    ray.get(gen.shutdown.remote(), timeout=30)
    ray.kill(gen)
    ray.kill(learner)


def _serve_other_scaling(generator, factor: float):
    """Runs in the generator: from now on vLLM scales every adapter it loads by ``factor`` x alpha / r
    (as an engine that took the adapters for rsLoRA would), while the folder it loads stays right."""
    from vllm.lora.peft_helper import PEFTHelper

    right = PEFTHelper._scaling
    PEFTHelper._scaling = lambda self, rank, alpha: right(self, rank, alpha) * factor


def _reuse_adapter_id(generator):
    """Runs in the generator: its engine gives every new version the id of the adapter it serves
    now, so vLLM serves its cached adapter and never reads the new folder."""
    engine = generator.weights.engine
    engine._adapter_id = lambda: engine.lora_request.lora_int_id


def _move_adapters(learner):
    """Runs in the learner: every B += 0.01 (a stand-in for a second update)."""
    with torch.no_grad():
        for layer in learner.adapters.layers().values():
            layer.lora_B["default"].weight.add_(0.01)


def test_lora_update_reaches_the_engine_through_the_adapter_sync(tiny_policy_path, local_ray):
    ppo = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8, lr=2e-2)
    learner = ray.remote(num_cpus=0.5)(Learner).remote(
        str(tiny_policy_path), ppo, KLConfig(), options=LearnerOptions(lora=LoraSpec(rank=8, alpha=32.0, sync="adapter")))
    gen = ray.remote(num_cpus=0.5)(Generator).remote(str(tiny_policy_path), "g0", max_model_len=64,
                                                   omp_threads_bind=core_list_for(0), max_lora_rank=8)
    members = {"g0": gen}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    shard = PromptShard(0, tuple(PromptItem(i, t, tuple(tok(t).input_ids)) for i, t in enumerate(PROMPTS)))
    spec = SamplingSpec(n=2, max_new_tokens=8, seed=3)

    broadcaster = WeightBroadcaster(learner, "object_store", verify=True, adapter=True)
    broadcaster.join(members)  # version 0: the adapters with B = 0 loaded and verified (probe = base model)
    assert broadcaster.last.probe_max_diff < 1e-4
    before = ray.get(gen.generate.options(num_returns=2).remote(shard, spec)[1])
    ray.get(learner.step.remote(before.with_rewards(np.arange(len(before.reward)) % 2.0, {})))

    res = broadcaster.publish(1, members)  # verify: read-back checksum and probe log-probs
    full = sum(t.numel() * t.element_size() for t in ray.get(learner.hf_state_dict.remote()).values())
    assert res.payload == "adapter" and res.checksum and res.probe_max_diff < 1e-4
    assert res.bytes * 10 < full

    engine_vs_policy, engine_vs_base = _engine_after_sync(learner, gen, shard, spec)
    print(f"\nLoRA adapter sync: {res.bytes} bytes (full model {full}) in {res.seconds * 1e3:.1f} ms, verify "
          f"{res.verify_seconds * 1e3:.1f} ms, probe max diff {res.probe_max_diff:.1e}; max |engine - learner| "
          f"log-prob {engine_vs_policy:.2e}, max |engine - base| {engine_vs_base:.2e}")
    assert engine_vs_policy < 1e-4
    assert engine_vs_base > 1e-2  # the engine computes with the adapters, not the base model

    # Broken on purpose 1: a reused adapter id -- vLLM serves its cached adapter of version 1. (The
    # learner's adapters move by hand: cheaper than another rollout and update.)
    ray.get(gen.__ray_call__.remote(_reuse_adapter_id))
    ray.get(learner.__ray_call__.remote(_move_adapters))
    with pytest.raises(WeightSyncError, match="adapter changed at version 2 but the engine's output did not"):
        broadcaster.publish(2, members)
    # Broken on purpose 2: the engine applies another scaling (1 instead of alpha / r = 4) while the
    # folder it loaded and reads back is right. Same version again, the id allocation repaired.
    ray.get(gen.__ray_call__.remote(lambda g: delattr(g.weights.engine, "_adapter_id")))
    ray.get(gen.__ray_call__.remote(_serve_other_scaling, 0.25))
    with pytest.raises(WeightSyncError, match=r"differ from the learner's by .* \(wrong adapter or scaling\)"):
        broadcaster.publish(2, members)
    ray.get(gen.shutdown.remote(), timeout=30)
    ray.kill(gen)
    ray.kill(learner)
