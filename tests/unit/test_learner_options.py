"""The learner's correctness options on the tiny model, without Ray, each against numbers computed
here from the prepared batch: rollout correction (tis / mis), loss aggregation, overlong handling,
the KL estimator of the loss term, the asymmetric clip, bf16 autocast."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ray_rlhf.bench.hf_sampler import hf_generate
from ray_rlhf.config.training import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.records import PromptItem, SamplingSpec

PROMPTS = ["The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog"]
ONE_STEP = PPOConfig(epochs=1, minibatch_size=16, micro_batch_size=16)


@pytest.fixture(scope="module")
def batch(tiny_policy_path):
    learner = Learner(str(tiny_policy_path), PPOConfig(), KLConfig(), seed=0)
    items = [PromptItem(i, p) for i, p in enumerate(PROMPTS)]
    out = hf_generate(learner.model.lm, learner.tokenizer, items, SamplingSpec(n=4, max_new_tokens=12, seed=2))
    scores = np.array([0.1, 0.4, 0.4, 0.9, 0.2, 0.3, 0.2, 0.6, 1.0, 0.0, 0.5, 0.5, 0.3, 0.6, 0.1, 0.8])
    return out.with_rewards(scores, {})


@pytest.fixture(scope="module")
def ragged(batch):
    """The batch with responses cut to lengths 12, 11, ..., 3, 12, ... (the tiny random model never
    samples EOS within 12 tokens, so every sampled response has 12)."""
    from ray_rlhf.records import RolloutBatch
    from tests.batches import sequences

    seqs = sequences(batch)
    cut = [12 - i % 10 for i in range(len(seqs))]
    return RolloutBatch.from_sequences(
        prompt_index=[s.prompt_index for s in seqs], sample_index=[s.key[1] for s in seqs],
        prompt_ids=[s.prompt_ids for s in seqs], response_ids=[s.response_ids[:n] for s, n in zip(seqs, cut)],
        sampler_logprobs=[s.sampler_logprobs[:n] for s, n in zip(seqs, cut)], prompt=[s.prompt for s in seqs],
        response=[s.response for s in seqs], finish_reason=["stop" if n < 12 else "length" for n in cut],
        policy_version=0, reward=batch.reward)


@pytest.fixture(scope="module")
def learner_logprobs(tiny_policy_path, batch):
    """The tiny model's own log-probs of every response token (what a fresh learner's pi_old is), flat
    in the record's token order."""
    learner = Learner(str(tiny_policy_path), ONE_STEP, KLConfig(), seed=0)
    prep, _ = learner.prepare(collate(batch, learner.pad_id))
    return prep.old_logprobs[prep.batch.response_mask.bool()].numpy()


def with_sampler(batch, flat: np.ndarray):
    return dataclasses.replace(batch, sampler_logprobs=flat.astype(np.float32))


def learner(path, ppo=ONE_STEP, kl=None, **opts) -> Learner:
    return Learner(str(path), ppo, kl or KLConfig(), seed=0, options=LearnerOptions(response_budget=12, **opts))


def row_slice(batch, row: int) -> slice:
    return slice(int(batch.response_offsets[row]), int(batch.response_offsets[row + 1]))


# ---- rollout correction ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_rollout_correction_weights_the_loss_by_the_learner_sampler_ratio(tiny_policy_path, batch, learner_logprobs,
                                                                          mode):
    """The sampler put log(3) less on every token of sequence 0 than the learner does (ratio 3), and
    the same as the learner elsewhere. tis (cap 2): sequence 0's tokens weigh min(3, 2) = 2; mis
    (C = 2): its geometric-mean ratio 3 leaves [1/2, 2], so it leaves the loss. At the first minibatch
    the ratio pi_new / pi_old is 1, so the policy loss is -sum_t w_t A_t / N (token mean)."""
    sampler = learner_logprobs.copy()
    sampler[row_slice(batch, 0)] -= math.log(3.0)
    lrn = learner(tiny_policy_path, algo=AlgoConfig(rollout_correction=mode, rollout_correction_cap=2.0))
    prep, pstats = lrn.prepare(collate(with_sampler(batch, sampler), lrn.pad_id))
    mask = prep.batch.response_mask
    expected_w = torch.ones_like(mask)
    expected_w[0] = 2.0 if mode == "tis" else 0.0
    assert torch.equal(prep.weights * mask, expected_w * mask)
    n0, n = float(mask[0].sum()), float(mask.sum())
    assert pstats["mismatch_kl"] == pytest.approx((3 - 1 - math.log(3)) * n0 / n, rel=1e-5)  # k3 with r = 3
    assert pstats["correction_truncated_frac" if mode == "tis" else "correction_masked_frac"] == pytest.approx(
        n0 / n if mode == "tis" else 1 / 16)
    stats = lrn.update(prep)
    hand = -float((expected_w * prep.advantages * mask).sum()) / n
    assert stats["policy_loss"] == pytest.approx(hand, abs=1e-6)


def test_rollout_correction_is_plain_ppo_when_the_log_probs_agree(tiny_policy_path, batch, learner_logprobs):
    seen = {}
    for mode in ("none", "tis", "mis"):
        lrn = learner(tiny_policy_path, algo=AlgoConfig(rollout_correction=mode))
        stats = lrn.step(with_sampler(batch, learner_logprobs))
        seen[mode] = (stats.policy_loss, stats.grad_norm, stats.mismatch_kl)
    assert seen["tis"] == seen["mis"] == seen["none"]
    assert seen["none"][2] == 0.0


# ---- loss aggregation --------------------------------------------------------------------------
def first_gradient(path, batch, agg, micro_batch_size, micro_batch_tokens=None):
    """The gradient of one optimizer step over the whole batch (read where AdamW would take it)."""
    ppo = PPOConfig(epochs=1, minibatch_size=16, micro_batch_size=micro_batch_size, micro_batch_tokens=micro_batch_tokens,
                    max_grad_norm=1e9)
    lrn = learner(path, ppo, algo=AlgoConfig(estimator="grpo", loss_agg=agg), kl_in_loss=True)
    with torch.no_grad():  # move the policy off the reference and off pi_old's ratio 1 after prepare
        g = torch.Generator().manual_seed(1)
        for p in lrn.model.lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    prep, _ = lrn.prepare(collate(batch, lrn.pad_id))
    with torch.no_grad():
        for p in lrn.model.lm.parameters():
            p.mul_(1.01)
    grads = {}
    step = lrn.optimizer.step
    lrn.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in lrn.model.named_parameters()
                                               if p.grad is not None})
    stats = lrn.update(prep)
    lrn.optimizer.step = step
    return prep, stats, grads


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_each_loss_aggregation_is_exact_across_micro_batches(tiny_policy_path, ragged, agg):
    _, s_full, full = first_gradient(tiny_policy_path, ragged, agg, 16)
    _, s_rows, rows = first_gradient(tiny_policy_path, ragged, agg, 3)
    _, s_tok, tok = first_gradient(tiny_policy_path, ragged, agg, 16, micro_batch_tokens=40)
    assert set(full) == set(rows) == set(tok) and len(full) > 10
    for other, s in ((rows, s_rows), (tok, s_tok)):
        assert s["policy_loss"] == pytest.approx(s_full["policy_loss"], rel=1e-5, abs=1e-7)
        for name in full:
            rel = (other[name] - full[name]).norm() / full[name].norm().clamp(min=1e-12)
            assert rel < 1e-5, (agg, name, float(rel))


def test_sequence_mean_aggregation_weights_each_sequence_equally(tiny_policy_path, ragged):
    """At ratio 1 (a fresh learner, first minibatch) the policy loss is -(1/B) sum_i mean_t A_it for
    seq_mean_token_mean, -(1/B) sum_i sum_t A_it / L_max for seq_mean_token_sum_norm, and
    -sum A / N for token_mean: three different numbers from the same advantages."""
    losses = {}
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        lrn = learner(tiny_policy_path, algo=AlgoConfig(estimator="grpo", loss_agg=agg), kl_in_loss=True)
        prep, _ = lrn.prepare(collate(ragged, lrn.pad_id))
        # per-token advantages of no special structure (GRPO's are centred per group: every
        # sequence mean would cancel to 0)
        prep = dataclasses.replace(prep, advantages=torch.randn(prep.advantages.shape,
                                                                 generator=torch.Generator().manual_seed(3)))
        m, a = prep.batch.response_mask.double(), prep.advantages.double()
        hand = {"token_mean": -(a * m).sum() / m.sum(),
                "seq_mean_token_mean": -((a * m).sum(1) / m.sum(1)).mean(),
                "seq_mean_token_sum_norm": -((a * m).sum(1) / 12).mean()}[agg]
        losses[agg] = lrn.update(prep)["policy_loss"]
        assert losses[agg] == pytest.approx(float(hand), abs=1e-6)
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


def test_dr_grpo_keeps_its_length_unbiased_aggregation_by_default():
    assert AlgoConfig(estimator="dr_grpo").agg == "seq_mean_token_sum_norm"
    assert AlgoConfig(estimator="grpo").agg == "token_mean"
    assert AlgoConfig(estimator="dr_grpo", loss_agg="token_mean").agg == "token_mean"


# ---- overlong handling -------------------------------------------------------------------------
def truncated_rows(batch, rows):
    reasons = batch.finish_reason.copy()
    reasons[:] = "stop"
    reasons[list(rows)] = "length"
    return dataclasses.replace(batch, finish_reason=reasons)


def test_overlong_mask_leaves_truncated_samples_out_of_the_update(tiny_policy_path, batch):
    cut = truncated_rows(batch, [0, 5, 9])
    lrn = learner(tiny_policy_path, overlong="mask")
    prep, pstats = lrn.prepare(collate(cut, lrn.pad_id))
    assert pstats["overlong_masked"] == 3 and len(prep.batch) == 13
    kept = set(prep.batch.prompt_index.tolist())
    assert kept == set(batch.prompt_index.tolist())  # only rows left, no whole prompt
    keep = learner(tiny_policy_path, overlong="keep")
    prep_keep, _ = keep.prepare(collate(cut, keep.pad_id))
    assert len(prep_keep.batch) == 16


def test_overlong_penalty_is_dapos_linear_punishment_on_the_score(tiny_policy_path, ragged):
    """max_new_tokens 12, buffer 4: 0 up to 8 tokens, (8 - L) / 4 for 8 < L <= 12."""
    batch = ragged
    lengths = batch.response_lengths
    hand = np.where(lengths <= 8, 0.0, (8 - lengths) / 4)
    assert (hand < 0).any() and (hand == 0).any(), lengths  # the batch exercises both zones
    opts = dict(algo=AlgoConfig(estimator="reinforce_pp"), old_logprobs_from_sampler=True)
    plain = learner(tiny_policy_path, **opts)
    pen = learner(tiny_policy_path, overlong="penalty", overlong_buffer=4, **opts)
    _, s_plain = plain.prepare(collate(batch, plain.pad_id))
    prep, s_pen = pen.prepare(collate(batch, pen.pad_id))
    assert s_pen["overlong_penalty_mean"] == pytest.approx(hand.mean(), abs=1e-6)
    shifted = learner(tiny_policy_path, **opts)
    prep_shifted, _ = shifted.prepare(collate(batch.with_rewards(batch.reward + hand, {}), shifted.pad_id))
    assert torch.allclose(prep.advantages, prep_shifted.advantages, atol=1e-6)  # = scoring with the penalty


# ---- KL estimator of the loss term, asymmetric clip --------------------------------------------
@pytest.mark.parametrize("estimator,hand", [("k2", lambda d: 0.5 * d**2), ("k3", lambda d: torch.exp(-d) - 1 + d)])
def test_the_kl_loss_term_uses_kl_estimator(tiny_policy_path, batch, estimator, hand):
    """``kl.approx`` is honoured where the KL acts as a loss (it used to be k3 whatever it said).
    At the first minibatch pi = pi_old, so the loss term is the estimator of pi_old vs the reference."""
    lrn = learner(tiny_policy_path, kl=KLConfig(approx=estimator, placement="loss"),
                  algo=AlgoConfig(estimator="grpo"), kl_in_loss=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in lrn.model.lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    prep, _ = lrn.prepare(collate(batch, lrn.pad_id))
    m = prep.batch.response_mask
    d = (prep.old_logprobs - prep.ref_logprobs).double()
    expected = float((hand(d).clamp(-10, 10) * m).sum() / m.sum())
    assert expected > 1e-4
    assert lrn.update(prep)["kl_loss"] == pytest.approx(expected, rel=1e-4)


def test_the_asymmetric_clip_reaches_the_policy_loss(tiny_policy_path, batch, monkeypatch):
    from ray_rlhf.algo import registry

    seen = []
    real = registry.get_policy_loss(registry.DEFAULT_POLICY_LOSS)  # what the PPO objective calls

    def spy(*args, **kwargs):
        seen.append((kwargs["clip_low"], kwargs["clip_high"]))
        return real.fn(*args, **kwargs)

    monkeypatch.setitem(registry.POLICY_LOSSES, real.name, dataclasses.replace(real, target=spy))
    learner(tiny_policy_path, PPOConfig(epochs=1, minibatch_size=16, micro_batch_size=16, clip=0.2, clip_high=0.28)
            ).step(batch)
    assert seen and set(seen) == {(0.2, 0.28)}


# ---- bf16 autocast -----------------------------------------------------------------------------
def test_bfloat16_runs_the_model_under_autocast_with_float32_outputs(tiny_policy_path, batch):
    """``learner.dtype=bfloat16`` without FSDP sharding: the forward passes run in bf16 (log-probs move
    by bf16 rounding, far above fp32's 1e-7), while log-probs, weights and gradients stay float32."""
    fp32 = learner(tiny_policy_path)
    bf16 = learner(tiny_policy_path, dtype="bfloat16")
    p32, _ = fp32.prepare(collate(batch, fp32.pad_id))
    p16, _ = bf16.prepare(collate(batch, bf16.pad_id))
    m = p32.batch.response_mask.bool()
    diff = (p16.old_logprobs - p32.old_logprobs)[m].abs().max().item()
    assert p16.old_logprobs.dtype == torch.float32 and 1e-4 < diff < 0.5, diff
    stats = bf16.update(p16)
    assert math.isfinite(stats["grad_norm"]) and all(p.dtype == torch.float32 for p in bf16.model.parameters())
