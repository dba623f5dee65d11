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
from tests.reference_math import dr_grpo_advantages_reference, grpo_advantages_reference, rloo_advantages_reference

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


def pre_clip_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Record every optimizer step's gradient as the learner hands it to the gradient-norm clip
    (after accumulation, before clipping and AdamW, which would hide a gradient's scale)."""
    seen: list[list[torch.Tensor]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, *args, **kwargs):
        parameters = list(parameters)
        seen.append([p.grad.clone() if p.grad is not None else None for p in parameters])
        return clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return seen


def test_sampler_logprobs_as_pi_old_give_the_recompute_gradient(tiny_policy_path, batch, monkeypatch):
    """The same weights sampled the batch, so the sampler's log-probs are the learner's up to
    round-off (~1e-7): pi_old from either gives the same first gradient, tensor by tensor (to 1e-5
    relative: a gradient off by any scale fails, which parameters after one AdamW step, a step of
    about lr * sign(g), would not show)."""
    ppo = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8)
    kl = KLConfig()
    a = Learner(str(tiny_policy_path), ppo, kl, seed=0)
    b = Learner(str(tiny_policy_path), ppo, kl, seed=0, options=LearnerOptions(old_logprobs_from_sampler=True))
    seen = pre_clip_gradients(monkeypatch)
    sa = a.step(batch)
    grads_a = seen[:]
    seen.clear()
    sb = b.step(batch)
    grads_b = seen[:]
    mismatch = sa.sampler_logprob_diff  # the sampler's log-probs vs the learner's on the same weights
    print(f"sampler vs learner logprob mismatch {mismatch:.2e}; policy loss {sa.policy_loss:.6f} vs {sb.policy_loss:.6f}")
    assert mismatch < 1e-4 and np.isnan(sb.sampler_logprob_diff)  # not measured when not recomputed
    assert len(grads_a) == len(grads_b) == 2  # two minibatches of 8
    names = [n for n, _ in a.model.named_parameters()]
    assert len(grads_a[0]) == len(names) > 10
    for name, ga, gb in zip(names, grads_a[0], grads_b[0]):  # the first minibatch: same weights in both
        assert ga is not None and gb is not None, name
        rel = (gb - ga).norm() / ga.norm()
        assert ga.norm() > 0 and rel < 1e-5, (name, float(rel))
    assert sb.policy_loss == pytest.approx(sa.policy_loss, abs=10 * mismatch)
    assert sb.ratio_mean == pytest.approx(sa.ratio_mean, abs=10 * mismatch)


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
    learner.save_state(tmp_path)
    assert not (tmp_path / "value_head.safetensors").exists()
    again = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8), KLConfig(),
                    seed=3, options=opts)
    again.load_state(tmp_path)
    assert again.weights_checksum() == learner.weights_checksum()


def hf_logprobs(lm, rollouts, width: int) -> torch.Tensor:
    """Each response token's log-prob by a plain, unpadded Hugging Face forward of each sequence
    (the reference form of the learner's padded, chunked one). Shape: (B, width), 0 at padding."""
    out = torch.zeros(len(rollouts), width)
    with torch.no_grad():
        for i in range(len(rollouts)):
            p = rollouts.prompt_ids[rollouts.prompt_offsets[i]:rollouts.prompt_offsets[i + 1]].tolist()
            r = rollouts.response_ids[rollouts.response_offsets[i]:rollouts.response_offsets[i + 1]].tolist()
            logits = lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            out[i, :len(r)] = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
    return out


GROUP_REFERENCES = {"grpo": grpo_advantages_reference, "dr_grpo": dr_grpo_advantages_reference,
                    "rloo": rloo_advantages_reference}


@pytest.mark.parametrize("estimator,placement", [("grpo", "loss"), ("dr_grpo", "loss"), ("rloo", "loss"),
                                                 ("grpo", "reward"), ("reinforce_pp", "reward")])
def test_the_kl_to_the_reference_acts_where_it_is_placed(tiny_policy_path, batch, estimator, placement):
    """The policy is moved away from the reference (the initial model), so the per-token KL is
    O(0.1-1) nats a sequence. Log-probs of both come from plain per-sequence HF forwards (the
    reference model loaded afresh from disk), and with ``r = log ref - log pi``::

        k1_t = -r                        (the reward penalty's estimator, and kl_ref)
        k3_t = e^r - 1 - r               (the loss term's, DeepSeekMath eq. 4)

    ``loss``: the advantages are the estimator's on the scores alone (its slow reference form in
    ``tests/reference_math.py``), and ``kl_loss`` is the token mean of k3 (Dr. GRPO: the sum over
    B * L_max) at the policy the update starts from. ``reward``: GRPO standardises
    ``score - beta sum_t k1_t`` in its group; REINFORCE++ normalises the returns of the per-token
    rewards ``-beta k1_t`` (+ the score at the last token) over the batch; no KL loss term."""
    from transformers import AutoModelForCausalLM

    from tests.reference_math import reinforce_pp_advantages_reference

    beta = 0.1
    opts = LearnerOptions(algo=AlgoConfig(estimator=estimator), kl_in_loss=placement == "loss", response_budget=12)
    learner = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=16, micro_batch_size=8),
                      KLConfig(beta=beta), seed=0, options=opts)
    with torch.no_grad():  # the reference stays the initial model
        g = torch.Generator().manual_seed(1)
        for p in learner.model.lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    prep, _ = learner.prepare(collate(batch, learner.pad_id))
    m = prep.batch.response_mask
    width = m.shape[1]
    logp = hf_logprobs(learner.model.lm, batch, width)
    ref = hf_logprobs(AutoModelForCausalLM.from_pretrained(tiny_policy_path).eval(), batch, width)
    r = (ref - logp) * m
    k1, k3 = -r, (torch.exp(r) - 1 - r) * m
    scores, groups = prep.batch.scores, prep.batch.group_ids
    if estimator == "reinforce_pp":
        outcome = torch.zeros_like(m)  # the score at each response's last token (right-padded)
        outcome[torch.arange(len(scores)), m.sum(1).long() - 1] = scores
        with_kl = reinforce_pp_advantages_reference(outcome - beta * k1, m)
        without = reinforce_pp_advantages_reference(outcome, m)
    else:
        with_kl = GROUP_REFERENCES[estimator](scores - beta * k1.sum(1), groups, m)
        without = GROUP_REFERENCES[estimator](scores, groups, m)
    assert (with_kl - without).abs().max() > 0.05  # the KL penalty matters to these advantages
    expected = without if placement == "loss" else with_kl
    torch.testing.assert_close(prep.advantages, expected, rtol=1e-4, atol=1e-4)

    stats = learner.step(batch)
    assert stats.kl_ref == pytest.approx(float(k1.sum(1).mean()), rel=1e-4, abs=1e-5)
    if placement == "loss":
        n = len(scores) * 12 if estimator == "dr_grpo" else m.sum()  # Dr. GRPO: B * L_max
        assert stats.kl_loss == pytest.approx(float(k3.sum() / n), rel=1e-4)
        assert stats.zero_std_groups == 1  # the second prompt's scores are all 0.2
    else:
        assert stats.kl_loss == 0.0
        if estimator == "grpo":
            assert stats.zero_std_groups == 0  # its KL-shaped scores differ


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
    assert stats.staleness_max == 1 and stats.staleness_mean == 1.0


def test_the_learner_refuses_a_token_older_than_the_staleness_bound(tiny_policy_path, batch):
    """rollout.partial: each token's version is checked too (here one token of version 0 in a batch
    whose sequences say version 2: only the per-token check can see it)."""
    import dataclasses

    learner = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=16, micro_batch_size=16), KLConfig(),
                      options=LearnerOptions(max_staleness=1))
    learner.version = 2
    fresh = dataclasses.replace(batch, policy_version=batch.policy_version + 2)
    versions = fresh.versions_per_token.copy()
    versions[0] = 0
    with pytest.raises(RuntimeError, match="per-token staleness bound violated: learner at version 2 got a token "
                                           "sampled by version 0"):
        learner.step(dataclasses.replace(fresh, token_versions=versions))
    versions[0] = 1  # lag 1: within the bound
    assert learner.step(dataclasses.replace(fresh, token_versions=versions)).staleness_max == 0


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_stale_samples_are_weighted_by_pi_old_over_the_samplers_probability(tiny_policy_path, batch, mode):
    """Decoupled PPO (``algo/off_policy.py``): with ``max_staleness >= 1`` each token's loss is
    weighted by ``w = pi_old / pi_behav`` -- the learner's own log-prob at the start of the update
    over the sampler's -- capped at C = 2 (``truncate``: min(w, C); ``mask``: 0 above C).

    The batch's sampler log-probs are set to the learner's pi_old minus known amounts
    ``delta = log w``, cycling over the raw weights (1.5, 3, 0.5, 1), so that::

        truncate: w = (1.5, 2, 0.5, 1)    mask: w = (1.5, 0, 0.5, 1)    max raw = 3, 1/4 over the cap

    With one minibatch the policy is still pi_old when the loss is taken: ratio 1, no clipping,
    and the loss is ``-sum_t w_t A_t / N``. Swapping pi_old and pi_behav would give the weights
    (2/3, 1/3, 2, 1) (and ratios 1/w): every check below fails."""
    import dataclasses

    cap = 2.0
    opts = LearnerOptions(max_staleness=1)
    learner = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=16, micro_batch_size=8, is_cap=cap,
                                                       is_mode=mode),
                      KLConfig(), seed=0, options=opts)
    learner.version = 1  # the batch was sampled by version 0: one step stale
    prep, _ = learner.prepare(collate(batch, learner.pad_id))  # pi_old does not depend on the sampler's log-probs
    mask = prep.batch.response_mask.bool()
    old = prep.old_logprobs[mask]  # (N,): the batch's tokens in its flat order (rows in order, right-padded)
    raw = torch.tensor([1.5, 3.0, 0.5, 1.0]).repeat(len(old) // 4 + 1)[:len(old)]
    stale = dataclasses.replace(batch, sampler_logprobs=(old - raw.log()).numpy().astype(np.float32))
    stats = learner.step(stale)

    w = raw.clamp(max=cap) if mode == "truncate" else torch.where(raw > cap, 0.0, raw)
    assert stats.staleness_max == 1
    assert stats.is_weight_mean == pytest.approx(float(w.mean()), rel=1e-5)  # 1.25 / 0.75 on a multiple of 4
    assert stats.is_weight_max == pytest.approx(3.0, rel=1e-5)
    assert stats.is_truncated_frac == pytest.approx(float((raw > cap).float().mean()), abs=1e-7)
    assert stats.ratio_mean == pytest.approx(1.0, abs=1e-5) and stats.clipfrac == 0.0
    adv = prep.advantages[mask]
    expected = -float((w * adv).sum()) / len(adv)
    unweighted = -float(adv.sum()) / len(adv)
    assert abs(expected - unweighted) > 1e-3  # the weights matter to this batch's loss
    assert stats.policy_loss == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert np.isfinite(stats.grad_norm)


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
