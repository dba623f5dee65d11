"""Rollout correction (sampler / learner mismatch): hand-computed TIS and MIS weights and stats."""

import math

import pytest
import torch

from ray_rlhf.algo.losses import policy_loss
from ray_rlhf.algo.rollout_correction import ROLLOUT_CORRECTIONS, RolloutCorrectionStats, rollout_correction_weights


def _k3(r):
    """k3 of KL(sampler || learner) for one token with ratio r = pi_learner / pi_sampler."""
    return r - 1 - math.log(r)


def _logps(ratios, mask):
    """(learner_logp, sampler_logp) with learner - sampler = log ratio at valid tokens, junk at padding."""
    sampler = torch.full(ratios.shape, -2.0)
    learner = sampler + torch.where(mask.bool(), ratios, torch.ones_like(ratios)).log()
    learner = torch.where(mask.bool(), learner, torch.tensor(math.nan))  # NaN junk at padding
    sampler = torch.where(mask.bool(), sampler, torch.tensor(-math.inf))  # -inf junk at padding
    return learner, sampler


# row 0: rho = 1.5, 3.0, padding;  row 1: rho = 0.5, 1.0, 2.5
TIS_RATIOS = torch.tensor([[1.5, 3.0, 1.0], [0.5, 1.0, 2.5]])
TIS_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_tis_by_hand():
    learner, sampler = _logps(TIS_RATIOS, TIS_MASK)
    w, s = rollout_correction_weights(learner, sampler, TIS_MASK, "tis", cap=2.0)
    # w = min(rho, 2): [1.5, 2, (pad) 1], [0.5, 1, 2]
    torch.testing.assert_close(w, torch.tensor([[1.5, 2.0, 1.0], [0.5, 1.0, 2.0]]))
    assert s.truncated_frac == pytest.approx(2 / 5)  # rho = 3.0 and 2.5 are above the cap
    assert s.weight_mean == pytest.approx((1.5 + 2.0 + 0.5 + 1.0 + 2.0) / 5)  # 1.4
    assert s.masked_frac == 0.0
    # k3 per token: 1.5 -> 0.0945349, 3 -> 0.9013877, 0.5 -> 0.1931472, 1 -> 0, 2.5 -> 0.5837093; mean 0.3545558
    assert s.mismatch_kl == pytest.approx(0.3545558, rel=1e-5)
    assert s.mismatch_kl == pytest.approx(sum(_k3(r) for r in (1.5, 3.0, 0.5, 1.0, 2.5)) / 5, rel=1e-5)


def test_tis_token_cap_lowers_the_cap():
    # decoupled PPO's is_cap = 1.8 < cap = 2: one weight min(rho, min(1.8, 2)) = [1.5, 1.8], [0.5, 1, 1.8]
    learner, sampler = _logps(TIS_RATIOS, TIS_MASK)
    w, s = rollout_correction_weights(learner, sampler, TIS_MASK, "tis", cap=2.0, token_cap=1.8)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.8, 1.0], [0.5, 1.0, 1.8]]))
    assert s.truncated_frac == pytest.approx(2 / 5)
    # a token cap above the cap changes nothing: min(rho, min(5, 2))
    w5, _ = rollout_correction_weights(learner, sampler, TIS_MASK, "tis", cap=2.0, token_cap=5.0)
    torch.testing.assert_close(w5, torch.tensor([[1.5, 2.0, 1.0], [0.5, 1.0, 2.0]]))


# row 0: rho 1.5, 3     -> g = sqrt(4.5)   = 2.1213 > 2          -> masked
# row 1: rho 0.5, 1, 2.5 -> g = 1.25^(1/3) = 1.0772 in [0.5, 2]  -> kept
# row 2: rho 0.25, 0.5  -> g = sqrt(0.125) = 0.3536 < 0.5        -> masked
# row 3: all padding                                             -> not a sequence, not counted
MIS_RATIOS = torch.tensor([[1.5, 3.0, 1.0], [0.5, 1.0, 2.5], [0.25, 0.5, 1.0], [1.0, 1.0, 1.0]])
MIS_MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]])


def test_mis_by_hand():
    learner, sampler = _logps(MIS_RATIOS, MIS_MASK)
    w, s = rollout_correction_weights(learner, sampler, MIS_MASK, "mis", cap=2.0)
    expected = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.equal(w, expected)
    assert s.masked_frac == pytest.approx(2 / 3)  # rows 0 and 2 of the 3 rows with a valid token
    assert s.weight_mean == pytest.approx(3 / 7)  # 7 valid tokens, the 3 of row 1 keep weight 1
    assert s.truncated_frac == 0.0  # no token cap
    ratios = (1.5, 3.0, 0.5, 1.0, 2.5, 0.25, 0.5)
    assert s.mismatch_kl == pytest.approx(sum(_k3(r) for r in ratios) / 7, rel=1e-5)  # over all valid tokens


def test_mis_keeps_the_truncated_token_weight_in_kept_sequences():
    # token_cap = is_cap = 2: row 1 keeps min(rho, 2) = [0.5, 1, 2]; masked rows stay 0
    learner, sampler = _logps(MIS_RATIOS, MIS_MASK)
    w, s = rollout_correction_weights(learner, sampler, MIS_MASK, "mis", cap=2.0, token_cap=2.0)
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.5, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(w, expected)
    assert s.weight_mean == pytest.approx((0.5 + 1.0 + 2.0) / 7)  # 0.5
    # rho = 2.5 of row 1 is truncated; rho = 3 of row 0 is not counted: its sequence is masked
    assert s.truncated_frac == pytest.approx(1 / 7)
    assert s.masked_frac == pytest.approx(2 / 3)


def test_mis_geometric_mean_is_length_normalised():
    # one token at rho = 3 masks a 1-token sequence (g = 3 > 2) but not a 4-token one (g = 3^(1/4) = 1.316)
    ratios = torch.tensor([[3.0, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    learner, sampler = _logps(ratios, mask)
    w, s = rollout_correction_weights(learner, sampler, mask, "mis", cap=2.0)
    assert w[0].tolist() == [0.0] * 4 and w[1].tolist() == [1.0] * 4 and s.masked_frac == 0.5


def test_none_measures_the_mismatch_only():
    learner, sampler = _logps(TIS_RATIOS, TIS_MASK)
    w, s = rollout_correction_weights(learner, sampler, TIS_MASK, "none", cap=2.0, token_cap=1.5)
    assert torch.equal(w, torch.ones(2, 3))
    assert (s.weight_mean, s.truncated_frac, s.masked_frac) == (1.0, 0.0, 0.0)
    assert s.mismatch_kl == pytest.approx(0.3545558, rel=1e-5)  # as in the TIS case


@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS)
@pytest.mark.parametrize("token_cap", [None, 1.0, 2.0])
def test_equal_log_probs_give_exactly_one_and_plain_ppo(mode, token_cap):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 1, 3, 0])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    old = -torch.rand(4, 5, generator=g) * 3
    logp = old + 0.3 * torch.randn(4, 5, generator=g)
    adv = torch.randn(4, 5, generator=g)
    w, s = rollout_correction_weights(old, old.clone(), mask, mode, cap=2.0, token_cap=token_cap)
    assert torch.equal(w, torch.ones_like(old))
    assert s == RolloutCorrectionStats(mismatch_kl=0.0, weight_mean=1.0, truncated_frac=0.0, masked_frac=0.0)
    a = logp.clone().requires_grad_(True)
    plain, _ = policy_loss(a, old, adv, mask, 0.2, num_tokens=9)
    plain.backward()
    b = logp.clone().requires_grad_(True)
    corrected, _ = policy_loss(b, old, adv, mask, 0.2, num_tokens=9, weights=w)
    corrected.backward()
    assert torch.equal(plain, corrected) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS)
def test_padding_junk_does_not_leak(mode):
    # the same valid tokens with clean (0) and junk (NaN / inf) padding give the same weights and stats
    learner, sampler = _logps(MIS_RATIOS, MIS_MASK)  # NaN / -inf at padding
    clean_l, clean_s = (torch.where(MIS_MASK.bool(), t, 0.0) for t in (learner, sampler))
    w, s = rollout_correction_weights(learner, sampler, MIS_MASK, mode, cap=2.0, token_cap=2.0)
    w0, s0 = rollout_correction_weights(clean_l, clean_s, MIS_MASK, mode, cap=2.0, token_cap=2.0)
    assert torch.isfinite(w).all() and torch.equal(w, w0) and s == s0
    assert all(math.isfinite(v) for v in (s.mismatch_kl, s.weight_mean, s.truncated_frac, s.masked_frac))


def test_weights_are_detached_and_extreme_ratios_stay_finite():
    # log rho = +-200 is clamped to +-20: rho = e^20 (truncated to the cap) and e^-20
    sampler = torch.tensor([[-1.0, -1.0]])
    learner = (sampler + torch.tensor([[200.0, -200.0]])).requires_grad_(True)
    w, s = rollout_correction_weights(learner, sampler, torch.ones(1, 2), "tis", cap=2.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([[2.0, math.exp(-20.0)]]))
    # k3: (e^20 - 1 - 20) and (e^-20 - 1 + 20), finite
    assert s.mismatch_kl == pytest.approx((math.exp(20) - 21 + math.exp(-20) + 19) / 2, rel=1e-5)


def test_tis_with_token_cap_is_the_decoupled_weight_not_its_square():
    # at staleness >= 1 learner_logp = old_logp (proximal) and sampler_logp = behav_logp: the TIS weight with
    # token_cap = is_cap <= cap is exactly decoupled PPO's truncated weight, applied once
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 4])[:, None]).float()
    old = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3
    behav = old + 0.8 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    logp = old + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    w, _ = rollout_correction_weights(old, behav, mask, "tis", cap=3.0, token_cap=2.0)
    decoupled, _ = policy_loss(logp, old, adv, mask, 0.2, behav_logp=behav, is_cap=2.0)
    weighted, _ = policy_loss(logp, old, adv, mask, 0.2, weights=w)
    assert torch.equal(decoupled, weighted)


def test_bad_arguments():
    z = torch.zeros(1, 2)
    m = torch.ones(1, 2)
    with pytest.raises(ValueError, match="tis"):  # the message lists the valid modes
        rollout_correction_weights(z, z, m, "seq", cap=2.0)
    for cap in (1.0, 0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="cap"):
            rollout_correction_weights(z, z, m, "tis", cap=cap)
    with pytest.raises(ValueError, match="token_cap"):
        rollout_correction_weights(z, z, m, "mis", cap=2.0, token_cap=0.5)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        rollout_correction_weights(z, torch.zeros(1, 3), m, "tis", cap=2.0)
