"""PPO losses: one hand-computed case per clipping branch, gradients, and split invariance."""

import math

import pytest
import torch

from ray_rlhf.algo.kl import kl_estimate, kl_k3
from ray_rlhf.algo.losses import (
    KL_LOSS_CLAMP,
    LOG_RATIO_BOUND,
    LOSS_AGGS,
    aggregate,
    dr_grpo_num_tokens,
    explained_variance,
    kl_loss,
    loss_denominators,
    policy_loss,
    value_loss,
)
from ray_rlhf.algo.masked import masked_sum

EPS = 0.2  # clip range [0.8, 1.2]


def _one_token(ratio, adv, requires_grad=False):
    """(logp, old_logp, advantages, mask) for one token with pi_new/pi_old = ratio."""
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).clone().requires_grad_(requires_grad)
    return logp, old, torch.tensor([[float(adv)]]), torch.ones(1, 1)


# (name, ratio, A, dual_clip, expected loss, clipped?, dual-clipped?)
BRANCHES = [
    # r = 1.5 > 1.2, A = 2 > 0: max(-1.5*2, -1.2*2) = max(-3.0, -2.4) = -2.4, clipped branch
    ("above_clip_pos_adv_clipped", 1.5, 2.0, None, -2.4, True, False),
    # r = 0.5 < 0.8, A = -1 < 0: max(-0.5*-1, -0.8*-1) = max(0.5, 0.8) = 0.8, clipped branch
    ("below_clip_neg_adv_clipped", 0.5, -1.0, None, 0.8, True, False),
    # r = 1.1 inside [0.8, 1.2], A = 3: both branches -1.1*3 = -3.3, unclipped
    ("inside_clip", 1.1, 3.0, None, -3.3, False, False),
    # r = 0.5 < 0.8, A = 2 > 0: max(-0.5*2, -0.8*2) = max(-1.0, -1.6) = -1.0, unclipped (pessimistic)
    ("below_clip_pos_adv_unclipped", 0.5, 2.0, None, -1.0, False, False),
    # r = 2 > 1.2, A = -1 < 0: max(-2*-1, -1.2*-1) = max(2.0, 1.2) = 2.0, unclipped
    ("above_clip_neg_adv_unclipped", 2.0, -1.0, None, 2.0, False, False),
    # same with dual clip c = 3: cap c*|A| = 3 > 2.0, not active -> 2.0
    ("dual_clip_inactive", 2.0, -1.0, 3.0, 2.0, False, False),
    # r = 4, A = -1, c = 3: max(4.0, 1.2) = 4.0, capped at 3*|-1| = 3.0 -> dual clip active
    ("dual_clip_active", 4.0, -1.0, 3.0, 3.0, False, True),
    # dual clip never touches A > 0: r = 4, A = 1: max(-4, -1.2) = -1.2, ordinary clip
    ("dual_clip_pos_adv_ignored", 4.0, 1.0, 3.0, -1.2, True, False),
]


@pytest.mark.parametrize("name,ratio,adv,dual,expected,clipped,dual_clipped", BRANCHES, ids=[b[0] for b in BRANCHES])
def test_policy_loss_branches(name, ratio, adv, dual, expected, clipped, dual_clipped):
    logp, old, a, mask = _one_token(ratio, adv, requires_grad=True)
    loss, stats = policy_loss(logp, old, a, mask, clip_eps=EPS, dual_clip=dual)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.clipfrac == float(clipped)
    assert stats.dual_clipfrac == float(dual_clipped)
    assert stats.ratio_mean == pytest.approx(ratio) and stats.ratio_max == pytest.approx(ratio)
    assert stats.approx_kl == pytest.approx(ratio - 1 - math.log(ratio), rel=1e-5)  # k3: r - 1 - log r
    # gradient: d(-A r)/d logp = -A r on the live branch; 0 when a clip (or the dual cap) holds
    loss.backward()
    live = not (clipped or dual_clipped)
    assert logp.grad.item() == pytest.approx(-adv * ratio if live else 0.0, rel=1e-6, abs=1e-12)


def test_policy_loss_batch_stats_and_gradient_with_global_num_tokens():
    # row 0: r = 1.1, A = 3 (inside)   | r = 1.5, A = 2 (clipped) | padding
    # row 1: r = 0.5, A = 2 (unclipped)| r = 0.5, A = -1 (clipped)| r = 2, A = -1 (unclipped)
    ratios = torch.tensor([[1.1, 1.5, 1.0], [0.5, 0.5, 2.0]])
    adv = torch.tensor([[3.0, 2.0, 100.0], [2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    old = torch.full((2, 3), -2.0)
    logp = (old + ratios.log()).requires_grad_(True)
    N = 10  # pretend this is one shard of a global batch with 10 valid tokens
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=EPS, num_tokens=N)
    # per token: -3.3, -2.4, (pad), -1.0, 0.8, 2.0 -> sum -3.9, divided by 10
    assert loss.item() == pytest.approx(-0.39, rel=1e-6)
    assert stats.clipfrac == pytest.approx(2 / 5)  # tokens (0,1) and (1,1)
    assert stats.ratio_mean == pytest.approx((1.1 + 1.5 + 0.5 + 0.5 + 2.0) / 5)
    assert stats.ratio_max == pytest.approx(2.0)  # the padded position is never the max
    loss.backward()
    # unclipped tokens: -A r / N; clipped tokens and padding: 0
    expected = torch.tensor([[-3.3, 0.0, 0.0], [-1.0, 0.0, 2.0]]) / N
    torch.testing.assert_close(logp.grad, expected)


def _random_batch(seed, B=6, T=8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 1, 5, 3, 7, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # many ratios outside the clip
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_v = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = old_v + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logp, old, adv, v, old_v, ret, mask


# minibatches of unequal sizes, and interleaved "data-parallel shards"
SPLITS = {"minibatches": [[0, 1], [2], [3, 4, 5]], "shards": [[0, 2, 4], [1, 3, 5]]}


@pytest.mark.parametrize("split", list(SPLITS))
def test_policy_loss_split_invariance(split):
    logp, old, adv, _, _, _, mask = _random_batch(0)
    full_logp = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_logp, old, adv, mask, clip_eps=EPS, dual_clip=2.0)
    full.backward()
    n_global = mask.sum()  # 26 valid tokens
    parts_logp = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in SPLITS[split]:
        part, _ = policy_loss(parts_logp[rows], old[rows], adv[rows], mask[rows], EPS, 2.0, num_tokens=n_global)
        part.backward()  # accumulate gradients as micro-batching does
        total = total + part
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(parts_logp.grad, full_logp.grad)
    # without num_tokens each piece is its own token mean, and the pieces do NOT sum to the full loss
    naive = sum(policy_loss(logp[r], old[r], adv[r], mask[r], EPS)[0].item() for r in SPLITS[split])
    assert naive != pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_split_invariance(split, clip):
    _, _, _, v, old_v, ret, mask = _random_batch(1)
    full, _ = value_loss(v, old_v, ret, mask, clip_eps=clip)
    total = sum(value_loss(v[r], old_v[r], ret[r], mask[r], clip, num_tokens=int(mask.sum()))[0] for r in SPLITS[split])
    assert total.item() == pytest.approx(full.item(), rel=1e-12)


# (name, V, V_old, R, expected 0.5*max(...), clipped?) with clip_eps = 0.2
VALUE_CASES = [
    # V - V_old = 0.5 -> V_clip = 1.2; (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> 0.5*0.64 = 0.32, clipped
    ("clipped_term_larger", 1.5, 1.0, 2.0, 0.32, True),
    # V - V_old = 0.1 inside the clip: both (1.1-2)^2 = 0.81 -> 0.405
    ("inside_clip", 1.1, 1.0, 2.0, 0.405, False),
    # V moved past the target: (1.5-1)^2 = 0.25 > (1.2-1)^2 = 0.04 -> 0.125, unclipped
    ("unclipped_term_larger", 1.5, 1.0, 1.0, 0.125, False),
]


@pytest.mark.parametrize("name,v,v_old,r,expected,clipped", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_value_loss_branches(name, v, v_old, r, expected, clipped):
    values = torch.tensor([[v]], requires_grad=True)
    loss, stats = value_loss(values, torch.tensor([[v_old]]), torch.tensor([[r]]), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.clipfrac == float(clipped)
    assert stats.value_mean == pytest.approx(v) and stats.return_mean == pytest.approx(r)
    loss.backward()
    # d/dV 0.5 (V - R)^2 = V - R on the unclipped term; 0 when the clipped term wins
    assert values.grad.item() == pytest.approx(0.0 if clipped else v - r, abs=1e-6)


def test_value_loss_unclipped_by_hand():
    values = torch.tensor([[1.0, 3.0, 7.0]])
    ret = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, torch.zeros(1, 3), ret, mask)
    # 0.5 * ((1-2)^2 + (3-1)^2) / 2 tokens = 0.5 * 5 / 2 = 1.25
    assert loss.item() == pytest.approx(1.25)
    assert stats.clipfrac == 0.0 and stats.value_mean == 2.0 and stats.return_mean == 1.5


def test_aggregate_by_hand():
    x = torch.tensor([[1.0, 2.0, math.nan], [3.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(x, mask).item() == 2.0  # (1 + 2 + 3) / 3
    assert aggregate(x, mask, num_tokens=6).item() == 1.0  # (1 + 2 + 3) / 6
    assert aggregate(x, mask, num_tokens=torch.tensor(12.0)).item() == 0.5
    assert aggregate(x, torch.zeros(2, 3)).item() == 0.0  # empty piece contributes nothing
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(x, mask, num_tokens=0)


def test_empty_mask_gives_zero_loss_and_zero_stats():
    z = torch.zeros(2, 3)
    loss, stats = policy_loss(z, z, z, z, clip_eps=EPS, num_tokens=5)
    assert loss.item() == 0.0 and stats.ratio_max == 0.0 and stats.clipfrac == 0.0


def test_bad_clip_arguments():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(z, z, z, z + 1, clip_eps=EPS, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(z, z, z, z + 1, clip_eps=0.0)


def test_explained_variance_by_hand():
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret.clone(), ret, mask) == pytest.approx(1.0)  # perfect
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0)  # the mean
    # V = [1, 2, 2]: R - V = [0, 0, 1], Var = 2/9; Var[R] = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), ret, mask) == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(ret, torch.ones(1, 4), mask))  # Var[R] = 0


def test_padding_junk_reaches_neither_loss_nor_gradient():
    # valid token: r = 1.1, A = 3 -> loss -3.3, grad -3.3; padding holds -inf / NaN junk
    old = torch.tensor([[-1.0, math.nan]])
    logp = torch.tensor([[-1.0 + math.log(1.1), -math.inf]], requires_grad=True)
    adv = torch.tensor([[3.0, math.nan]])
    mask = torch.tensor([[1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=EPS, dual_clip=3.0)
    assert loss.item() == pytest.approx(-3.3, rel=1e-6) and stats.ratio_max == pytest.approx(1.1)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-3.3, 0.0]]))


# ---- the log-ratio clamp --------------------------------------------------------------------------

# (log-ratio, A, dual_clip, expected loss) with clip_eps = 0.2; the clamp makes r = e^(+-20)
EXTREME = [
    # log r = 200 -> 20, A = 1: max(-e^20, -1.2) = -1.2 (clipped)
    (200.0, 1.0, None, -1.2),
    # log r = 200 -> 20, A = -1: max(e^20, 1.2) = e^20 = 4.85e8, finite (would be inf unclamped)
    (200.0, -1.0, None, math.exp(20.0)),
    # same with dual clip 3: capped at 3 |A| = 3
    (200.0, -1.0, 3.0, 3.0),
    # log r = -200 -> -20, A = 1: max(-e^-20, -0.8) = -e^-20 = -2.06e-9 (pessimistic, unclipped)
    (-200.0, 1.0, None, -math.exp(-20.0)),
    # log r = -200 -> -20, A = -1: max(e^-20, 0.8) = 0.8 (clipped)
    (-200.0, -1.0, None, 0.8),
]


@pytest.mark.parametrize("log_ratio,adv,dual,expected", EXTREME)
def test_extreme_log_ratio_gives_finite_loss_and_gradient(log_ratio, adv, dual, expected):
    assert LOG_RATIO_BOUND == 20.0
    old = torch.tensor([[-1.0]])
    logp = (old + log_ratio).requires_grad_(True)
    loss, stats = policy_loss(logp, old, torch.tensor([[adv]]), torch.ones(1, 1), clip_eps=EPS, dual_clip=dual)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(stats.ratio_max) and math.isfinite(stats.approx_kl)
    loss.backward()
    # beyond the bound the clamp is flat: finite (zero) gradient instead of inf / NaN
    assert torch.isfinite(logp.grad).all() and logp.grad.item() == 0.0


def test_log_ratio_just_inside_the_bound_keeps_its_gradient():
    # log r = 19: unclipped A < 0 branch, l = -A r, d l / d logp = -A r = e^19
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old + 19.0).requires_grad_(True)
    loss, _ = policy_loss(logp, old, torch.tensor([[-1.0]], dtype=torch.float64), torch.ones(1, 1), clip_eps=EPS)
    loss.backward()
    assert loss.item() == pytest.approx(math.exp(19.0)) and logp.grad.item() == pytest.approx(math.exp(19.0))


# ---- Dr. GRPO aggregation ---------------------------------------------------------------------------


def test_dr_grpo_aggregation_by_hand():
    x = torch.tensor([[1.0, 2.0, math.nan], [3.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # B = 2 sequences, budget L_max = 4: (1/B) sum_i (1/L_max) sum_t = (1/2) ((1 + 2)/4 + 3/4) = 0.75
    n = dr_grpo_num_tokens(2, 4)
    assert n == 8 and aggregate(x, mask, num_tokens=n).item() == 0.75  # (1 + 2 + 3) / 8
    with pytest.raises(ValueError, match="max_response_len"):
        dr_grpo_num_tokens(2, 0)


def test_dr_grpo_aggregation_weighs_every_token_equally_and_composes_over_micro_batches():
    logp, old, adv, _, _, _, mask = _random_batch(2)  # 6 rows of lengths 8, 1, 5, 3, 7, 2
    L_max = 8
    n = dr_grpo_num_tokens(len(mask), L_max)  # 6 * 8 = 48, whatever the lengths
    x = torch.ones_like(logp, requires_grad=True)
    aggregate(x, mask, num_tokens=n).backward()
    # every valid token, in a long or a short row, has weight 1 / (B L_max) = 1/48
    # (GRPO's per-sequence mean would give 1 / (B |o_i|): 1/48 in the 8-token row, 1/6 in the 1-token row)
    torch.testing.assert_close(x.grad, mask.to(x.dtype) / 48)
    full_logp = logp.clone().requires_grad_(True)
    full, _ = policy_loss(full_logp, old, adv, mask, clip_eps=EPS, num_tokens=n)
    full.backward()
    parts_logp = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in SPLITS["minibatches"]:
        part, _ = policy_loss(parts_logp[rows], old[rows], adv[rows], mask[rows], EPS, num_tokens=n)
        part.backward()
        total = total + part
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(parts_logp.grad, full_logp.grad)


# ---- KL as a loss -----------------------------------------------------------------------------------


def test_kl_loss_k3_value_and_gradient_one_token():
    # logp = -1, ref = -1.5: log r = ref - logp = -0.5
    # k3 = e^-0.5 - 1 + 0.5 = 0.10653066; d k3 / d logp = 1 - e^-0.5 = 0.39346934
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, stats = kl_loss(logp, torch.tensor([[-1.5]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(math.exp(-0.5) - 0.5, rel=1e-6)
    assert stats.kl_mean == pytest.approx(0.10653066, rel=1e-6) and stats.kl_max == stats.kl_mean
    loss.backward()
    assert logp.grad.item() == pytest.approx(1 - math.exp(-0.5), rel=1e-6)  # 0.39346934
    # logp = -2, ref = -1: log r = 1; k3 = e - 2 = 0.71828183; gradient 1 - e = -1.71828183 (raise logp)
    logp = torch.tensor([[-2.0]], requires_grad=True)
    loss, _ = kl_loss(logp, torch.tensor([[-1.0]]), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(math.e - 2, rel=1e-6)
    assert logp.grad.item() == pytest.approx(1 - math.e, rel=1e-6)


def test_kl_loss_batch_num_tokens_padding_and_other_estimators():
    logp = torch.tensor([[-1.0, -2.0, math.nan], [-0.7, -math.inf, 0.0]], requires_grad=True)  # junk padding
    ref = torch.tensor([[-1.5, -1.0, 1.0], [-0.7, math.nan, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = kl_loss(logp, ref, mask, num_tokens=10)
    # k3 per token: 0.10653066, 0.71828183, 0 (logp = ref) -> sum 0.82481249 / 10
    assert loss.item() == pytest.approx(0.082481249, rel=1e-6)
    assert stats.kl_mean == pytest.approx(0.82481249 / 3, rel=1e-6) and stats.kl_max == pytest.approx(math.e - 2)
    loss.backward()
    # (1 - e^(ref - logp)) / 10 on valid tokens, exactly 0 (not NaN) on padding; no gradient into ref
    expected = torch.tensor([[1 - math.exp(-0.5), 1 - math.e, 0.0], [0.0, 0.0, 0.0]]) / 10
    torch.testing.assert_close(logp.grad, expected)
    assert ref.grad is None
    # k2 = 0.5 (logp - ref)^2 -> gradient logp - ref: 0.5 and -1.0 (token mean over 3 tokens)
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.7, 0.0, 0.0]], requires_grad=True)
    loss, _ = kl_loss(lp, ref.detach().nan_to_num(), mask, estimator="k2")
    assert loss.item() == pytest.approx((0.125 + 0.5 + 0.0) / 3)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.0, 0.0]]) / 3)
    with pytest.raises(ValueError, match="k4"):
        kl_loss(lp, lp, mask, estimator="k4")


def test_kl_loss_clamps_each_token_at_kl_loss_clamp():
    assert KL_LOSS_CLAMP == 10.0
    # token 0: logp = -1, ref = -1.5: k3 = e^-0.5 - 1 + 0.5 = 0.10653066 (below the clamp)
    # token 1: logp = -5, ref = -1: ref - logp = 4, k3 = e^4 - 1 - 4 = 49.59815 -> clamped to 10
    logp = torch.tensor([[-1.0, -5.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, stats = kl_loss(logp, ref, torch.ones(1, 2))
    assert kl_k3(torch.tensor(-5.0), torch.tensor(-1.0)).item() == pytest.approx(math.exp(4) - 5)  # 49.6 unclamped
    # (0.10653066 + 10) / 2 = 5.05326533
    assert loss.item() == pytest.approx((math.exp(-0.5) - 0.5 + 10.0) / 2, rel=1e-6)
    assert stats.kl_max == 10.0 and stats.kl_mean == pytest.approx(5.05326533, rel=1e-6)  # clamped values
    loss.backward()
    # unclamped token: (1 - e^-0.5) / 2 = 0.19673467; clamped token: exactly 0 (not 1 - e^4 = -53.6)
    assert logp.grad[0, 0].item() == pytest.approx((1 - math.exp(-0.5)) / 2, rel=1e-6)
    assert logp.grad[0, 1].item() == 0.0
    # k1 = logp - ref = -15 is clamped from below to -10, also without gradient
    lp = torch.tensor([[-16.0]], requires_grad=True)
    loss, stats = kl_loss(lp, torch.tensor([[-1.0]]), torch.ones(1, 1), estimator="k1")
    loss.backward()
    assert loss.item() == -10.0 and stats.kl_max == -10.0 and lp.grad.item() == 0.0


def test_kl_loss_below_the_clamp_is_unchanged_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 5, generator=g) * 3
    ref = logp + torch.randn(4, 5, generator=g)  # |ref - logp| of a few units: k3 well below 10
    mask = torch.ones(4, 5)
    for est in ("k1", "k2", "k3"):
        a = logp.clone().requires_grad_(True)
        loss, _ = kl_loss(a, ref, mask, estimator=est, num_tokens=1)
        assert kl_estimate(logp, ref, est).abs().max() < KL_LOSS_CLAMP
        assert torch.equal(loss, masked_sum(kl_estimate(logp, ref, est), mask) / 1)
        loss.backward()
        b = logp.clone().requires_grad_(True)
        masked_sum(kl_estimate(b, ref, est), mask).backward()
        assert torch.equal(a.grad, b.grad)


# ---- asymmetric clip (DAPO clip-higher) -------------------------------------------------------------

# (name, ratio, A, clip_low, clip_high, expected loss, clipped?) with clip_eps = 0.2
ASYMMETRIC = [
    # clip [0.9, 1.3]: r = 1.5 > 1.3, A = 2: max(-1.5*2, -1.3*2) = max(-3.0, -2.6) = -2.6, clipped
    ("above_clip_high_pos_adv", 1.5, 2.0, 0.1, 0.3, -2.6, True),
    # clip [0.9, 1.3]: r = 1.25 <= 1.3, A = 2: -1.25*2 = -2.5, NOT clipped (symmetric 0.2 would give -2.4)
    ("inside_clip_high_only", 1.25, 2.0, 0.1, 0.3, -2.5, False),
    # clip [0.9, 1.3]: r = 0.85 < 0.9, A = -1: max(0.85, 0.9) = 0.9, clipped (symmetric 0.2 would give 0.85)
    ("below_clip_low_neg_adv", 0.85, -1.0, 0.1, 0.3, 0.9, True),
    # clip [0.9, 1.3]: r = 1.1 inside, A = 3: -1.1*3 = -3.3, unclipped
    ("inside", 1.1, 3.0, 0.1, 0.3, -3.3, False),
    # clip_low defaults to clip_eps = 0.2 -> [0.8, 1.28]: r = 0.7, A = -1: max(0.7, 0.8) = 0.8, clipped
    ("clip_low_defaults_to_clip_eps", 0.7, -1.0, None, 0.28, 0.8, True),
    # clip_high defaults to clip_eps = 0.2 -> [0.7, 1.2]: r = 1.25, A = 2: max(-2.5, -2.4) = -2.4, clipped
    ("clip_high_defaults_to_clip_eps", 1.25, 2.0, 0.3, None, -2.4, True),
]


@pytest.mark.parametrize("name,ratio,adv,low,high,expected,clipped", ASYMMETRIC, ids=[c[0] for c in ASYMMETRIC])
def test_policy_loss_asymmetric_clip_branches(name, ratio, adv, low, high, expected, clipped):
    logp, old, a, mask = _one_token(ratio, adv, requires_grad=True)
    loss, stats = policy_loss(logp, old, a, mask, clip_eps=EPS, clip_low=low, clip_high=high)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.clipfrac == float(clipped)
    loss.backward()
    # gradient -A r on the live branch, 0 where the clip holds
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -adv * ratio, rel=1e-6, abs=1e-12)


def test_policy_loss_explicit_symmetric_clip_and_all_ones_weights_are_bit_for_bit_the_default():
    logp, old, adv, _, _, _, mask = _random_batch(4)
    a = logp.clone().requires_grad_(True)
    plain, s0 = policy_loss(a, old, adv, mask, EPS, 2.0, num_tokens=30)
    plain.backward()
    b = logp.clone().requires_grad_(True)
    same, s1 = policy_loss(
        b, old, adv, mask, EPS, 2.0, num_tokens=30, clip_low=EPS, clip_high=EPS, weights=torch.ones_like(logp)
    )
    same.backward()
    assert torch.equal(plain, same) and torch.equal(a.grad, b.grad) and s0 == s1


def test_bad_asymmetric_clip_and_weights_arguments():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(z, z, z, z + 1, clip_eps=EPS, clip_low=0.0)
    with pytest.raises(ValueError, match="clip_high"):
        policy_loss(z, z, z, z + 1, clip_eps=EPS, clip_high=-0.1)
    with pytest.raises(ValueError, match="weights"):
        policy_loss(z, z, z, z + 1, clip_eps=EPS, weights=torch.ones(1, 2))


# ---- per-token loss weights -------------------------------------------------------------------------


def test_policy_loss_weights_by_hand():
    # token 0: r = 1.1, A = 3 -> -3.3 (inside); token 1: r = 1.5, A = 2 -> -2.4 (clipped); token 2: padding
    # weights 0.5, 2.0, NaN (junk at padding): (0.5 * -3.3 + 2.0 * -2.4) / 2 = (-1.65 - 4.8) / 2 = -3.225
    ratios = torch.tensor([[1.1, 1.5, 1.0]])
    old = torch.full((1, 3), -2.0)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([[3.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    w = torch.tensor([[0.5, 2.0, math.nan]], requires_grad=True)
    loss, _ = policy_loss(logp, old, adv, mask, clip_eps=EPS, weights=w)
    assert loss.item() == pytest.approx(-3.225, rel=1e-6)
    loss.backward()
    # d/dlogp: 0.5 * -A r / 2 = 0.5 * -3.3 / 2 = -0.825; clipped token and padding: 0; nothing into w
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.825, 0.0, 0.0]]))
    assert w.grad is None


def test_policy_loss_weights_multiply_after_the_behaviour_weight_and_dual_clip():
    # r = 4, A = -1, dual clip 3: max(4, 1.2) = 4 capped at 3; raw IS weight pi_old / pi_behav = 1.5 (< cap 2)
    # weight 0.5: 3 * 1.5 * 0.5 = 2.25
    old = torch.tensor([[-1.0]])
    logp = old + math.log(4.0)
    behav = old - math.log(1.5)
    loss, stats = policy_loss(
        logp, old, torch.tensor([[-1.0]]), torch.ones(1, 1), EPS, 3.0, behav_logp=behav, weights=torch.tensor([[0.5]])
    )
    assert loss.item() == pytest.approx(2.25, rel=1e-6)
    assert stats.dual_clipfrac == 1.0 and stats.is_weight_mean == pytest.approx(1.5)


# ---- per-row denominators and the aggregation modes -------------------------------------------------


def test_aggregate_per_row_denominators_by_hand():
    x = torch.tensor([[1.0, 2.0, math.nan], [3.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2) / 2 + 3 / 4 = 1.5 + 0.75 = 2.25
    assert aggregate(x, mask, num_tokens=torch.tensor([[2.0], [4.0]])).item() == 2.25
    # the same denominator on every row is the scalar form: (1 + 2 + 3) / 6 = 1.0
    assert aggregate(x, mask, num_tokens=torch.tensor([[6.0], [6.0]])).item() == 1.0
    with pytest.raises(ValueError, match="loss_denominators"):
        aggregate(x, mask, num_tokens=torch.ones(3, 1))


def test_loss_denominators_by_hand():
    # 2 x 3 example: rows of 2 and 1 valid tokens, sums 3 and 3; B = 2 sequences, N = 3 tokens, L_max = 3
    x = torch.tensor([[1.0, 2.0, math.nan], [3.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = mask.sum(-1)  # [2, 1]
    # token_mean: N_i = N = 3 -> (1 + 2 + 3) / 3 = 2.0
    d = loss_denominators("token_mean", rows, num_sequences=2, num_tokens=3, max_response_len=3)
    assert d.shape == (2, 1) and d.tolist() == [[3.0], [3.0]]
    assert aggregate(x, mask, d).item() == 2.0
    # seq_mean_token_mean: N_i = B * |o_i| = [4, 2] -> (1/2) ((1 + 2)/2 + 3/1) = (1.5 + 3) / 2 = 2.25
    d = loss_denominators("seq_mean_token_mean", rows, num_sequences=2, num_tokens=3, max_response_len=3)
    assert d.tolist() == [[4.0], [2.0]] and aggregate(x, mask, d).item() == 2.25
    # seq_mean_token_sum_norm: N_i = B * L_max = 6 -> (1/2) ((1 + 2)/3 + 3/3) = 1.0 = (1 + 2 + 3) / dr_grpo_num_tokens
    d = loss_denominators("seq_mean_token_sum_norm", rows, num_sequences=2, num_tokens=3, max_response_len=3)
    assert d.tolist() == [[6.0], [6.0]] and aggregate(x, mask, d).item() == 1.0
    assert aggregate(x, mask, dr_grpo_num_tokens(2, 3)).item() == 1.0
    # an all-padding row gets N_i = B * 1 (no division by 0) and contributes 0
    d = loss_denominators("seq_mean_token_mean", torch.tensor([0, 2]), num_sequences=4, num_tokens=3, max_response_len=3)
    assert d.tolist() == [[4.0], [8.0]]
    # num_tokens as a 0-d tensor (a global count reduced across ranks)
    d = loss_denominators("token_mean", rows, num_sequences=2, num_tokens=torch.tensor(7), max_response_len=3)
    assert d.tolist() == [[7.0], [7.0]]


def test_loss_denominators_rejects_bad_arguments():
    rows = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="seq_mean_token_mean"):  # the message lists the valid modes
        loss_denominators("seq-mean-token-mean", rows, 2, 3, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        loss_denominators("token_mean", rows, 2, 0, 3)
    with pytest.raises(ValueError, match="num_sequences"):
        loss_denominators("seq_mean_token_mean", rows, 0, 3, 3)
    with pytest.raises(ValueError, match="max_response_len"):
        loss_denominators("seq_mean_token_sum_norm", rows, 2, 3, 0)
    with pytest.raises(ValueError, match="row_tokens"):
        loss_denominators("token_mean", rows[:, None], 2, 3, 3)


def _mode_reference(mode, x, mask, L_max):
    """The mode's loss written out row by row, as the docstring's formulas."""
    B = x.shape[0]
    sums = [sum(float(x[i, t]) for t in range(x.shape[1]) if mask[i, t]) for i in range(B)]
    lens = [int(mask[i].sum()) for i in range(B)]
    if mode == "token_mean":
        return sum(sums) / sum(lens)
    if mode == "seq_mean_token_mean":
        return sum(s / max(n, 1) for s, n in zip(sums, lens)) / B
    return sum(s / L_max for s in sums) / B


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_aggregation_modes_are_invariant_to_micro_batching(mode, dtype, rel):
    assert mode in LOSS_AGGS
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([6, 1, 4, 2, 5])  # 5 rows of different lengths, 18 valid tokens
    T, L_max = 6, 8
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    x0 = torch.randn(5, T, generator=g, dtype=dtype)
    n_global = mask.sum()
    x = x0.clone().requires_grad_(True)
    whole = aggregate(x, mask, loss_denominators(mode, mask.sum(-1), 5, n_global, L_max))
    whole.backward()
    assert whole.item() == pytest.approx(_mode_reference(mode, x0, mask, L_max), rel=rel)
    xp = x0.clone().requires_grad_(True)
    total = 0.0
    for rows in ([0, 1], [2], [3, 4]):
        d = loss_denominators(mode, mask[rows].sum(-1), num_sequences=5, num_tokens=n_global, max_response_len=L_max)
        part = aggregate(xp[rows], mask[rows], d)
        part.backward()
        total = total + part
    assert total.item() == pytest.approx(whole.item(), rel=rel)
    torch.testing.assert_close(xp.grad, x.grad, rtol=rel, atol=0.0)
    if dtype == torch.float64:
        assert torch.equal(xp.grad, x.grad)  # each token's gradient m_it / N_i is computed identically
    # the gradient is the mode's token weight: 1/N, 1/(B |o_i|) or 1/(B L_max)
    weight = {
        "token_mean": torch.full((5, 1), 1 / 18.0),
        "seq_mean_token_mean": 1 / (5.0 * lengths[:, None].to(torch.float64)),
        "seq_mean_token_sum_norm": torch.full((5, 1), 1 / 40.0),
    }[mode]
    torch.testing.assert_close(x.grad, (weight * mask).to(dtype))


def test_policy_loss_accepts_per_row_denominators():
    # row 0: r = 1.1, A = 3 -> -3.3 | r = 1.5, A = 2 -> -2.4 (clipped) | padding           sum -5.7
    # row 1: r = 0.5, A = 2 -> -1.0 | r = 0.5, A = -1 -> 0.8 (clipped) | r = 2, A = -1 -> 2.0   sum 1.8
    ratios = torch.tensor([[1.1, 1.5, 1.0], [0.5, 0.5, 2.0]])
    adv = torch.tensor([[3.0, 2.0, 100.0], [2.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    old = torch.full((2, 3), -2.0)
    logp = (old + ratios.log()).requires_grad_(True)
    # seq_mean_token_mean with B = 2: N = [2*2, 2*3] = [4, 6] -> -5.7/4 + 1.8/6 = -1.425 + 0.3 = -1.125
    d = loss_denominators("seq_mean_token_mean", mask.sum(-1), 2, 5, 3)
    loss, _ = policy_loss(logp, old, adv, mask, clip_eps=EPS, num_tokens=d)
    assert loss.item() == pytest.approx(-1.125, rel=1e-6)
    loss.backward()
    expected = torch.tensor([[-3.3 / 4, 0.0, 0.0], [-1.0 / 6, 0.0, 2.0 / 6]])
    torch.testing.assert_close(logp.grad, expected)


def test_value_loss_accepts_per_row_denominators():
    # row 0: 0.5 ((1-2)^2 + (3-1)^2) = 2.5; row 1: 0.5 (2-0)^2 = 2.0 (+ padding)
    values = torch.tensor([[1.0, 3.0], [2.0, 9.0]], requires_grad=True)
    ret = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # N = [5, 4]: 2.5/5 + 2.0/4 = 0.5 + 0.5 = 1.0
    loss, _ = value_loss(values, torch.zeros(2, 2), ret, mask, num_tokens=torch.tensor([[5.0], [4.0]]))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    # (V - R) / N_i: [-1/5, 2/5], [2/4, 0]
    torch.testing.assert_close(values.grad, torch.tensor([[-0.2, 0.4], [0.5, 0.0]]))


def test_kl_loss_accepts_per_row_denominators():
    # row 0: k3 = 0.10653066 + 0.71828183 = 0.82481249; row 1: k3 = 0.10653066 (logp -1, ref -1.5) + padding
    logp = torch.tensor([[-1.0, -2.0], [-1.0, math.nan]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-1.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # N = [2, 4]: 0.82481249/2 + 0.10653066/4 = 0.41240625 + 0.02663267 = 0.43903891
    loss, _ = kl_loss(logp, ref, mask, num_tokens=torch.tensor([[2.0], [4.0]]))
    assert loss.item() == pytest.approx(0.43903891, rel=1e-6)
    loss.backward()
    # (1 - e^(ref - logp)) / N_i
    g0, g1 = 1 - math.exp(-0.5), 1 - math.e
    torch.testing.assert_close(logp.grad, torch.tensor([[g0 / 2, g1 / 2], [g0 / 4, 0.0]]))
