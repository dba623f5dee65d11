"""GAE: the fast scan against the slow loop, plus a case computed by hand."""

import math

import pytest
import torch

from ray_rlhf.algo.advantages import gae
from tests.reference_math import gae_reference


def test_gae_tiny_by_hand():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[1.0, 0.0, 2.0, 5.0], [3.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0], [1.0, 9.0, 9.0, 9.0]])  # 9 / 7 = padding junk
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # row 0: delta_2 = 2 + 0.9*0   - 1.5 = 0.5   (value after the last token is 0)
    #        delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35
    #        delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4
    #        A_2 = 0.5; A_1 = 0.35 + 0.72*0.5 = 0.71; A_0 = 1.4 + 0.72*0.71 = 1.9112
    #        R = A + V = [2.4112, 1.71, 2.0]
    # row 1: delta_0 = 3 - 1 = 2 = A_0; R_0 = 3
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(ref_adv, adv)
    torch.testing.assert_close(ref_ret, ret)


def _ragged(seed, B=7, T=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1  # always a full row and a one-token row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    rewards[mask == 0] = math.nan  # padding junk must not leak
    values[mask == 0] = 1e6
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_reference_on_random_ragged(seed, gamma, lam):
    rewards, values, mask = _ragged(seed)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-10, atol=1e-10)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_with_gamma_lam_one_is_reward_to_go():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t, so returns are the undiscounted rewards-to-go
    rewards, values, mask = _ragged(3)
    _, ret = gae(rewards, values, mask.bool(), 1.0, 1.0)
    r = torch.where(mask.bool(), rewards, 0.0)
    to_go = r.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(ret, to_go)


def test_gae_with_lam_zero_is_one_step_td():
    rewards, values, mask = _ragged(4)
    adv, _ = gae(rewards, values, mask, 0.9, 0.0)
    v = torch.where(mask.bool(), values, 0.0)
    r = torch.where(mask.bool(), rewards, 0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)
    torch.testing.assert_close(adv, (r + 0.9 * next_v - v) * mask)


def test_gae_rejects_left_padding():
    with pytest.raises(ValueError, match=r"rows \[0\] are not right-padded"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1, 1], [1, 1, 0]]), 1.0, 1.0)
