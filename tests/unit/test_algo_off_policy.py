"""Off-policy correction of the PPO loss: decoupled PPO / truncated importance sampling."""

import math

import pytest
import torch

from ray_rlhf.algo.losses import policy_loss
from ray_rlhf.algo.off_policy import importance_weights

EPS = 0.2


def _batch(seed, B=6, T=8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 1, 5, 3, 7, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    behav = old + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)  # weights both above and below 2
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logp, old, behav, adv, mask


@pytest.mark.parametrize("dual", [None, 2.0])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_behaviour_equal_to_proximal_is_the_identity_bit_for_bit(dual, mode):
    logp, old, _, adv, mask = _batch(0)
    a = logp.clone().requires_grad_(True)
    plain, s0 = policy_loss(a, old, adv, mask, EPS, dual, num_tokens=40)
    plain.backward()
    b = logp.clone().requires_grad_(True)
    corrected, s1 = policy_loss(b, old, adv, mask, EPS, dual, num_tokens=40, behav_logp=old.clone(), is_mode=mode)
    corrected.backward()
    assert torch.equal(plain, corrected) and torch.equal(a.grad, b.grad)
    assert (s1.is_weight_mean, s1.is_weight_max, s1.is_truncated_frac) == (1.0, 1.0, 0.0)
    assert (s0.is_weight_mean, s0.is_weight_max, s0.is_truncated_frac) == (1.0, 1.0, 0.0)  # no behav_logp
    for field in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max", "dual_clipfrac"):
        assert getattr(s0, field) == getattr(s1, field)


# (raw weight pi_old / pi_behav, mode, applied weight w, truncated?) with cap 2; token r = 1.1, A = 3
ONE_TOKEN = [
    (1.5, "truncate", 1.5, False),  # below the cap: the full weight
    (0.5, "truncate", 0.5, False),  # weights < 1 are never raised
    (3.0, "truncate", 2.0, True),  # min(3, 2) = 2
    (3.0, "mask", 0.0, True),  # AReaL: above the cap, the token is dropped
    (1.5, "mask", 1.5, False),
]


@pytest.mark.parametrize("raw,mode,w,truncated", ONE_TOKEN)
def test_one_token_by_hand(raw, mode, w, truncated):
    # r = pi / pi_old = 1.1 inside [0.8, 1.2], A = 3: plain loss -3.3, plain gradient -A r = -3.3
    # weighted: loss w * -3.3, gradient w * -3.3 (w is a constant)
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(1.1)).requires_grad_(True)
    behav = old - math.log(raw)  # log pi_old - log pi_behav = log raw
    loss, stats = policy_loss(logp, old, torch.tensor([[3.0]]), torch.ones(1, 1), EPS, behav_logp=behav, is_mode=mode)
    assert loss.item() == pytest.approx(-3.3 * w, rel=1e-5)
    loss.backward()
    assert logp.grad.item() == pytest.approx(-3.3 * w, rel=1e-5)
    assert stats.is_weight_mean == pytest.approx(w, rel=1e-6)
    assert stats.is_weight_max == pytest.approx(raw, rel=1e-6)
    assert stats.is_truncated_frac == float(truncated)


def test_weight_stats_on_a_batch():
    # raw weights 0.5, 1, 3, 4 and a padded position (junk): cap 2
    old = torch.zeros(1, 5)
    behav = -torch.tensor([[0.5, 1.0, 3.0, 4.0, 1.0]]).log()
    behav[0, 4] = math.nan
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w, s = importance_weights(old, behav, mask, cap=2.0)
    # truncate: 0.5, 1, 2, 2 -> mean 5.5 / 4 = 1.375; raw max 4; truncated 2 of 4 tokens
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0, 2.0, 2.0, 1.0]]))
    assert (s.weight_mean, s.weight_max, s.truncated_frac) == pytest.approx((1.375, 4.0, 0.5))
    # mask: 0.5, 1, 0, 0 -> mean 1.5 / 4 = 0.375
    w, s = importance_weights(old, behav, mask, cap=2.0, mode="mask")
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.0, 0.0, 0.0, 1.0]]))
    assert (s.weight_mean, s.weight_max, s.truncated_frac) == pytest.approx((0.375, 4.0, 0.5))


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_gradient_is_the_weighted_plain_gradient(mode):
    # w is detached: d(w l)/d logp = w dl/d logp, token by token
    logp, old, behav, adv, mask = _batch(1)
    a = logp.clone().requires_grad_(True)
    policy_loss(a, old, adv, mask, EPS, 3.0, num_tokens=26)[0].backward()
    b = logp.clone().requires_grad_(True)
    loss, stats = policy_loss(b, old, adv, mask, EPS, 3.0, num_tokens=26, behav_logp=behav, is_cap=2.0, is_mode=mode)
    loss.backward()
    w, _ = importance_weights(old, behav, mask, 2.0, mode)
    torch.testing.assert_close(b.grad, w * a.grad)
    assert 0 < stats.is_truncated_frac < 1 and stats.is_weight_max > 2.0


def test_corrected_loss_composes_over_micro_batches():
    logp, old, behav, adv, mask = _batch(2)
    full_logp = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_logp, old, adv, mask, EPS, behav_logp=behav, is_cap=5.0)
    full.backward()
    parts_logp = logp.clone().requires_grad_(True)
    n = mask.sum()
    total = 0.0
    for rows in ([0, 2, 4], [1, 3, 5]):
        part, _ = policy_loss(
            parts_logp[rows], old[rows], adv[rows], mask[rows], EPS, num_tokens=n, behav_logp=behav[rows], is_cap=5.0
        )
        part.backward()
        total = total + part
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(parts_logp.grad, full_logp.grad)


def test_bad_arguments():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="cap must be a finite number >= 1"):
        policy_loss(z, z, z, z + 1, EPS, behav_logp=z, is_cap=0.5)
    with pytest.raises(ValueError, match="'clip'.*truncate, mask"):
        policy_loss(z, z, z, z + 1, EPS, behav_logp=z, is_mode="clip")
    with pytest.raises(ValueError, match="behav_logp must have the shape"):
        policy_loss(z, z, z, z + 1, EPS, behav_logp=torch.zeros(1, 2))
