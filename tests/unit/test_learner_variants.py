"""Learner variants on the tiny model, without Ray: critic-free estimators, token-budget
micro-batching, the sampler's log-probs as pi_old, and the staleness bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_rlhf.bench.hf_sampler import hf_generate
from ray_rlhf.config.training import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.records import PromptItem, SamplingSpec

PROMPTS = ["The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog"]


@pytest.fixture(scope="module")
def batch(tiny_policy_path):
    learner = Learner(str(tiny_policy_path), PPOConfig(), KLConfig(), seed=0)
    items = [PromptItem(i, p) for i, p in enumerate(PROMPTS)]
    out = hf_generate(learner.model.lm, learner.tokenizer, items, SamplingSpec(n=4, max_new_tokens=12, seed=2))
    scores = np.array([0.1, 0.4, 0.4, 0.9, 0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.5, 0.5, 0.3, 0.6, 0.1, 0.8])
    return out.with_rewards(scores, {})  # the second prompt's group scores all 0.2: zero std


def grads(path, batch, ppo, options=None):
    """Gradient of the first minibatch's loss, and the step's stats, from a fresh learner."""
    torch.manual_seed(0)
    learner = Learner(str(path), ppo, KLConfig(), seed=0, options=options)
    with torch.no_grad():  # move the policy so that ratios differ from 1 (some clipped)
        g = torch.Generator().manual_seed(1)
        for p in learner.model.lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    prep, _ = learner.prepare(collate(batch, learner.pad_id))
    learner.optimizer.zero_grad()
    mb = torch.arange(len(prep.batch))
    real = prep.batch.response_mask.sum()
    from ray_rlhf.learning.batch import micro_batches

    for idx in micro_batches(mb, prep.batch.lengths, ppo.micro_batch_size, ppo.micro_batch_tokens):
        learner._micro_step(prep, idx, real, real)
    return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}


def test_token_budget_micro_batches_give_the_full_batch_gradient(tiny_policy_path, batch):
    full = grads(tiny_policy_path, batch, PPOConfig(minibatch_size=16, micro_batch_size=16))
    packed = grads(tiny_policy_path, batch, PPOConfig(minibatch_size=16, micro_batch_size=16, micro_batch_tokens=40))
    assert set(full) == set(packed) and len(full) > 10
    for name in full:
        rel = (packed[name] - full[name]).norm() / full[name].norm().clamp(min=1e-12)
        assert rel < 1e-6, (name, float(rel))


def test_sampler_logprobs_as_pi_old_give_the_recompute_update(tiny_policy_path, batch):
    ppo = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8)
    a = Learner(str(tiny_policy_path), ppo, KLConfig(), seed=0)
    b = Learner(str(tiny_policy_path), ppo, KLConfig(), seed=0, options=LearnerOptions(old_logprobs_from_sampler=True))
    sa, sb = a.step(batch), b.step(batch)
    mismatch = sa.sampler_logprob_diff  # the sampler's log-probs vs the learner's on the same weights
    print(f"sampler vs learner logprob mismatch {mismatch:.2e}; policy loss {sa.policy_loss:.6f} vs {sb.policy_loss:.6f}")
    assert mismatch < 1e-4 and np.isnan(sb.sampler_logprob_diff)  # not measured when not recomputed
    assert sb.policy_loss == pytest.approx(sa.policy_loss, abs=10 * mismatch)
    assert sb.ratio_mean == pytest.approx(sa.ratio_mean, abs=10 * mismatch)
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-4), n


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_build_run_and_save_no_value(tiny_policy_path, batch, estimator, tmp_path):
    opts = LearnerOptions(algo=AlgoConfig(estimator=estimator), kl_in_loss=estimator != "reinforce_pp",
                          old_logprobs_from_sampler=True, response_budget=12)
    learner = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8), KLConfig(),
                      seed=0, options=opts)
    assert learner.model.value_head is None
    stats = learner.step(batch)
    assert np.isfinite(stats.policy_loss) and np.isfinite(stats.grad_norm) and stats.optimizer_steps == 2
    assert np.isnan(stats.value_loss) and np.isnan(stats.explained_variance)
    if estimator != "reinforce_pp":
        assert stats.zero_std_groups == 1 and stats.kl_loss != 0.0
    learner.save_state(tmp_path)
    assert not (tmp_path / "value_head.safetensors").exists()
    again = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8), KLConfig(),
                    seed=3, options=opts)
    again.load_state(tmp_path)
    assert again.weights_checksum() == learner.weights_checksum()


def test_dropping_zero_std_groups_leaves_them_out_of_the_update(tiny_policy_path, batch):
    opts = LearnerOptions(algo=AlgoConfig(estimator="grpo", drop_zero_std_groups=True), kl_in_loss=True)
    learner = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=4), KLConfig(),
                      seed=0, options=opts)
    stats = learner.step(batch)
    assert stats.zero_std_groups == 1 and stats.dropped_sequences == 4 and stats.optimizer_steps == 3  # 12 / 4


def test_the_learner_refuses_a_batch_older_than_the_staleness_bound(tiny_policy_path, batch):
    import dataclasses

    learner = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=16, micro_batch_size=16), KLConfig(),
                      options=LearnerOptions(max_staleness=1))
    learner.version = 2
    with pytest.raises(RuntimeError, match="staleness bound violated: learner at version 2 got samples of version 0"):
        learner.step(batch)
    stats = learner.step(dataclasses.replace(batch, policy_version=batch.policy_version + 1))
    assert stats.staleness_max == 1 and stats.is_weight_mean > 0


def test_compiled_layers_give_the_eager_gradient(tiny_policy_path, batch, monkeypatch):
    """``learner.compile``: every decoder layer compiled (policy and reference); prepare and one
    minibatch's forward/backward give the eager gradient (fused kernels round differently: 1e-5)."""
    from ray_rlhf.learning import parallel

    counted = []
    compile_layers = parallel.compile_layers
    monkeypatch.setattr(parallel, "compile_layers", lambda *m: counted.append(compile_layers(*m)) or counted[-1])
    ppo = PPOConfig(minibatch_size=16, micro_batch_size=8)
    eager = grads(tiny_policy_path, batch, ppo)
    compiled = grads(tiny_policy_path, batch, ppo, LearnerOptions(compile=True))
    assert counted == [4]  # tiny: 2 layers in the policy, 2 in the reference
    assert set(eager) == set(compiled) and len(eager) > 10
    for name in eager:
        rel = (compiled[name] - eager[name]).norm() / eager[name].norm().clamp(min=1e-12)
        assert rel < 1e-5, (name, float(rel))
