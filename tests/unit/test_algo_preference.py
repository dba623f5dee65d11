"""SFT NLL, Bradley-Terry, DPO (sigmoid, cDPO label smoothing) and IPO against hand-computed numbers."""

import math

import pytest
import torch

from ray_rlhf.algo.preference import bradley_terry_loss, dpo_loss, sft_loss


def test_sft_loss_is_mean_nll_over_response_tokens_only():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    loss = sft_loss(lp, mask)
    # response tokens: -2, -3, -4 -> -(-2 - 3 - 4) / 3 = 3.0; prompt tokens -1, -5, -6 unused
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    # dL/dlp = -m / 3
    assert torch.allclose(lp.grad, -mask.float() / 3)


def test_sft_loss_over_microbatches_weighted_by_token_count_equals_full_batch():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    full = sft_loss(lp, mask)
    n = mask.sum()
    parts = sum(sft_loss(lp[i : i + 2], mask[i : i + 2]) * mask[i : i + 2].sum() / n for i in range(0, 6, 2))
    assert torch.allclose(full, parts)


def test_sft_loss_refuses_empty_mask():
    with pytest.raises(ValueError, match="no response token"):
        sft_loss(torch.zeros(1, 2), torch.zeros(1, 2))


def test_bradley_terry_by_hand():
    rc = torch.tensor([2.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0])
    loss, stats = bradley_terry_loss(rc, rr)
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147; mean 0.410038
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.410038, abs=1e-6)
    assert stats.accuracy == 0.5  # a tie counts as wrong
    assert stats.margin == pytest.approx(1.0)
    loss.backward()
    # dL/dr_c = -sigmoid(-z) / B: z=2 -> -0.119203 / 2 = -0.0596015; z=0 -> -0.5 / 2 = -0.25
    assert torch.allclose(rc.grad, torch.tensor([-0.0596015, -0.25]), atol=1e-6)


def test_bradley_terry_margin_is_subtracted():
    loss, _ = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))
    # z = [2 - 1, 0] -> log(1 + e^-1) = 0.313262, log 2 = 0.693147 -> mean 0.503204
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)


def test_bradley_terry_is_stable_for_large_differences():
    loss, _ = bradley_terry_loss(torch.tensor([1000.0]), torch.tensor([-1000.0]))
    assert loss.item() == 0.0
    loss, _ = bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert loss.item() == pytest.approx(2000.0)


# one pair: log pi(c) = -1, ref(c) = -2, log pi(r) = -3, ref(r) = -2
# chosen log-ratio = 1, rejected log-ratio = -1, h = 2; beta = 0.5 -> beta h = 1
PAIR = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))


def test_dpo_sigmoid_by_hand():
    loss, stats = dpo_loss(*PAIR, beta=0.5)
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    # implicit rewards: 0.5 * 1 = 0.5, 0.5 * -1 = -0.5, margin 1.0
    assert (stats.chosen, stats.rejected, stats.margin, stats.accuracy) == pytest.approx((0.5, -0.5, 1.0, 1.0))


def test_cdpo_label_smoothing_by_hand():
    loss, _ = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    assert loss.item() == pytest.approx(0.413262, abs=1e-6)


def test_ipo_by_hand():
    loss, _ = dpo_loss(*PAIR, beta=0.5, loss="ipo")
    # (h - 1 / (2 beta))^2 = (2 - 1)^2 = 1
    assert loss.item() == pytest.approx(1.0)
    loss, _ = dpo_loss(*PAIR, beta=0.25, loss="ipo")
    # (2 - 2)^2 = 0
    assert loss.item() == pytest.approx(0.0)


def test_dpo_gradient_by_hand():
    pc = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(pc, *PAIR[1:], beta=0.5)
    loss.backward()
    # dL/dpc = -beta * sigmoid(-beta h) = -0.5 * sigmoid(-1) = -0.5 * 0.268941 = -0.134471
    assert pc.grad.item() == pytest.approx(-0.134471, abs=1e-6)


def test_dpo_at_reference_is_log2_and_zero_margin():
    z = torch.zeros(3)
    loss, stats = dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats.margin == 0.0 and stats.accuracy == 0.0


@pytest.mark.parametrize("kw", [{"beta": 0.0}, {"beta": -1.0}, {"beta": 0.1, "loss": "hinge"}, {"beta": 0.1, "label_smoothing": 0.5}])
def test_dpo_refuses_bad_settings(kw):
    with pytest.raises(ValueError):
        dpo_loss(*PAIR, **kw)
