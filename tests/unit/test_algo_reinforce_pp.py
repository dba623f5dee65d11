"""REINFORCE++: discounted token returns and batch-global normalisation, by hand and against a slow
reference (1 vs 2 learner ranks: tests/integration/test_learner_group.py)."""

import math

import pytest
import torch

from ray_rlhf.algo.advantages import discounted_returns, reinforce_pp_advantages
from ray_rlhf.algo.kl import per_token_rewards
from ray_rlhf.algo.masked import masked_whiten
from tests.reference_math import reinforce_pp_advantages_reference


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 2.0, math.nan]], dtype=torch.float64)  # NaN = padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma = 0.5, G_t = r_t + 0.5 G_{t+1}:
    #   row 0: G_2 = 1.0; G_1 = -0.2 + 0.5 * 1.0 = 0.3; G_0 = 0.1 + 0.5 * 0.3 = 0.25
    #   row 1: G_1 = 2.0; G_0 = 0.0 + 0.5 * 2.0 = 1.0
    ret = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.3, 1.0], [1.0, 2.0, 0.0]], dtype=torch.float64))
    # valid returns [0.25, 0.3, 1.0, 1.0, 2.0]: mean 4.55 / 5 = 0.91
    # deviations -0.66, -0.61, 0.09, 0.09, 1.09; squares sum 0.4356 + 0.3721 + 0.0081 + 0.0081 + 1.1881 = 2.012
    # sample std sqrt(2.012 / 4) = sqrt(0.503) = 0.70922493
    std = math.sqrt(0.503)
    expected = torch.tensor([[-0.66, -0.61, 0.09], [0.09, 1.09, 0.0]], dtype=torch.float64) / (std + 1e-8)
    expected[1, 2] = 0.0
    adv = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    torch.testing.assert_close(adv, expected)  # [[-0.93059, -0.86009, 0.12690], [0.12690, 1.53689, 0]]
    torch.testing.assert_close(reinforce_pp_advantages_reference(rewards, mask, gamma=0.5), expected)


def test_reinforce_pp_on_kl_shaped_rewards_gamma_one():
    # score at the last token, -beta * KL per token (beta = 0.1); gamma = 1 -> reward-to-go
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = per_token_rewards(torch.tensor([1.0, -1.0]), kl, mask, beta=0.1)  # [[-0.1, -0.2, 0.7], [-1.4, 0, 0]]
    # returns: row 0: 0.4, 0.5, 0.7; row 1: -1.4
    torch.testing.assert_close(discounted_returns(r, mask), torch.tensor([[0.4, 0.5, 0.7], [-1.4, 0.0, 0.0]]))
    # mean (0.4 + 0.5 + 0.7 - 1.4) / 4 = 0.05; deviations 0.35, 0.45, 0.65, -1.45
    # squares 0.1225 + 0.2025 + 0.4225 + 2.1025 = 2.85; std sqrt(2.85 / 3) = sqrt(0.95) = 0.97467943
    expected = torch.tensor([[0.35, 0.45, 0.65], [-1.45, 0.0, 0.0]]) / math.sqrt(0.95)
    torch.testing.assert_close(reinforce_pp_advantages(r, mask), expected)


def _ragged(seed, B=7, T=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards[mask == 0] = math.nan  # padding junk must not leak
    return rewards, mask


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.5, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_pp_matches_reference_on_random_ragged(seed, gamma):
    rewards, mask = _ragged(seed)
    adv = reinforce_pp_advantages(rewards, mask, gamma)
    torch.testing.assert_close(adv, reinforce_pp_advantages_reference(rewards, mask, gamma), rtol=1e-10, atol=1e-10)
    assert (adv[mask == 0] == 0).all()


def test_whole_batch_normalisation_is_masked_whiten_of_the_returns():
    # both use the sample std over valid tokens; only the eps placement differs (1e-8)
    rewards, mask = _ragged(3)
    ret = discounted_returns(rewards, mask, 0.9)
    adv = reinforce_pp_advantages(rewards, mask, 0.9)
    torch.testing.assert_close(adv, masked_whiten(ret, mask), rtol=1e-6, atol=1e-7)




def test_returns_reject_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        reinforce_pp_advantages(torch.zeros(1, 3), torch.tensor([[0, 1, 1]]))
