"""Packed micro-batches give the padded form's gradient (fp32, tiny model) for every estimator."""

from __future__ import annotations

import pytest
import torch

from ray_rlhf.algo.registry import estimator_names
from ray_rlhf.config.schema import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning.learner import Learner, LearnerOptions
from tests.batches import make_batch

# 4 prompts x 2 samples with a spread of prompt and response lengths (long tail: one 11-token response)
PROMPT_LENS = [3, 6, 4, 5]
RESPONSE_LENS = [2, 11, 5, 3, 7, 1, 4, 6]


def _rollouts():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, n in enumerate(RESPONSE_LENS):
        p = i // 2
        prompt = torch.randint(3, 60, (PROMPT_LENS[p],), generator=torch.Generator().manual_seed(p)).tolist()
        rows.append(dict(prompt_index=p, sample_index=i % 2, prompt_ids=prompt,
                         response_ids=torch.randint(3, 60, (n,), generator=g).tolist(),
                         sampler_logprobs=[-1.0] * n, reward=float((i * 7) % 3)))
    return make_batch(rows)


def _grads(path, estimator: str, packing: bool) -> dict[str, torch.Tensor]:
    ppo = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=3, micro_batch_tokens=24)
    opts = LearnerOptions(algo=AlgoConfig(estimator=estimator), response_budget=12, packing=packing)
    learner = Learner(str(path), ppo, KLConfig(), seed=0, options=opts)
    learner.step(_rollouts())
    return {n: p.grad.detach().clone() for n, p in learner.engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("estimator", estimator_names())
def test_packed_gradient_equals_padded(tiny_policy_path, estimator):
    padded, packed = _grads(tiny_policy_path, estimator, False), _grads(tiny_policy_path, estimator, True)
    assert padded.keys() == packed.keys() and padded
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_stats_have_no_padding(tiny_policy_path):
    ppo = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=3, micro_batch_tokens=24)
    learner = Learner(str(tiny_policy_path), ppo, KLConfig(), seed=0, options=LearnerOptions(packing=True))
    stats = learner.step(_rollouts())
    assert stats.padded_tokens == stats.real_tokens == sum(PROMPT_LENS[i // 2] + n for i, n in enumerate(RESPONSE_LENS))
