"""LoRA's merged sync (``lora.sync=merged``) on a real local Ray with a real vLLM engine.

A LoRA learner actor (rank 8) and one generator: after a LoRA update and a verified publish (the
engine's read-back checksum equals the learner's merged weights), the engine's log-probs of the
tokens it samples equal the learner's adapted policy's within the fp32 tolerance, and differ from
the base model's (the reference, adapters off): the update reached the engine.
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


def test_lora_update_reaches_the_engine_through_the_merged_sync(tiny_policy_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
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

        after = ray.get(gen.generate.options(num_returns=2).remote(shard, spec)[1])
        assert set(after.policy_version.tolist()) == {1}
        policy, base, sampler, mask = _policy_and_base_logprobs(learner, after)
        m = mask.bool()
        engine_vs_policy = (sampler - policy)[m].abs().max().item()
        engine_vs_base = (sampler - base)[m].abs().max().item()
        print(f"\nLoRA merged sync: {res.bytes} bytes in {res.seconds * 1e3:.1f} ms; max |engine - learner| "
              f"log-prob {engine_vs_policy:.2e}, max |engine - base| {engine_vs_base:.2e}")
        assert engine_vs_policy < 1e-4
        assert engine_vs_base > 1e-2  # the engine computes with the update, not the base weights
        ray.get(gen.shutdown.remote(), timeout=30)
    finally:
        ray.shutdown()
