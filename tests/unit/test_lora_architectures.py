"""LoRA over the architecture matrix (HF side, no Ray or vLLM): one learner step per architecture
with the default targets (every linear layer of the decoder trunk): the targets resolve, the
adapters move, the base weights do not, and the merged export carries the base model's names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ray_rlhf.config.training import KLConfig, PPOConfig
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.learning.loading import load_causal_lm
from ray_rlhf.learning.lora import LoraSpec
from ray_rlhf.preflight import vllm_serves_lora
from tests.architectures import ARCHITECTURES, VOCAB_SIZE, build_arch
from tests.batches import make_batch

SERVES_LORA = {"llama_tied": True, "qwen2": True, "qwen3": True, "gpt2": False, "gemma2": True, "gemma3": True,
               "mistral": True, "phi3": True, "granite": True, "cohere": True}
"""Whether vLLM 0.32's class for the architecture implements SupportsLoRA (``lora.sync=adapter``;
without it only ``merged`` works, which any architecture the engine loads takes)."""


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_archs")
    return {n: build_arch(n, root / n, seed=0) for n in ARCHITECTURES}


def _rollouts(seed: int = 0):
    """4 sequences of random token ids (prompt 5, response 6), rewards 0..3."""
    g = np.random.default_rng(seed)
    return make_batch([{"prompt_ids": g.integers(3, VOCAB_SIZE, 5).tolist(), "response_ids": g.integers(3, VOCAB_SIZE, 6).tolist(),
                        "sampler_logprobs": [-6.0] * 6, "reward": float(i)} for i in range(4)])


def merged_layers(adapters) -> set[str]:
    """The weights the merge changes (the adapted layers'); the rest of the export is the base's own."""
    return {f"{n}.weight" for n in adapters.targets}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_one_lora_step_per_architecture(arch_dirs, name):
    learner = Learner(str(arch_dirs[name]), PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=4, lr=1e-2),
                      KLConfig(), options=LearnerOptions(lora=LoraSpec(rank=4, alpha=8.0)))
    adapters = learner.adapters
    assert set(adapters.layers()) == set(adapters.targets) and len(adapters.targets) >= 4  # each default target adapted
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    stats = learner.step(_rollouts())
    assert np.isfinite(stats.policy_loss) and np.isfinite(stats.grad_norm)
    after = learner.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k or k.startswith("value_head.") for k in changed)
    assert sum(".lora_B." in k for k in changed) == len(adapters.layers())  # every adapter's B moved
    merged = learner.hf_state_dict()
    base = load_causal_lm(str(arch_dirs[name]), "cpu").state_dict()
    assert set(merged) == set(base) and all(torch.equal(merged[k], base[k]) for k in base if k not in merged_layers(adapters))
    arch = json.loads((arch_dirs[name] / "config.json").read_text())["architectures"][0]
    assert vllm_serves_lora(arch) in (SERVES_LORA[name], None), arch
