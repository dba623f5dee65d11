"""Multi-turn estimators (``algo/holes.py`` and the registry): observation tokens are holes that
carry no reward, KL, value target or advantage, and the recursions step from one model token to
the next over them. Hand-computed cases, the slow loop references on random inputs, and the
single-turn results bit-identical to the plain estimators'."""

from __future__ import annotations

import pytest
import torch

from ray_rlhf.algo import registry
from ray_rlhf.algo.advantages import (
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from ray_rlhf.algo.groups import zero_std_groups
from ray_rlhf.algo.holes import (
    Holes,
    discounted_returns_over_holes,
    gae_over_holes,
    longest_run,
    reinforce_pp_over_holes,
)
from ray_rlhf.algo.kl import per_token_rewards
from ray_rlhf.algo.masked import masked_whiten
from ray_rlhf.algo.registry import AdvantageInputs
from tests.reference_math import discounted_returns_with_holes_reference, gae_with_holes_reference

# one row: [m, m, o, o, m, pad] -- model turn 1 (2 tokens), an observation (2 tokens), model turn 2
MASK = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
LOSS = torch.tensor([[1.0, 1, 0, 0, 1, 0]])


def test_gae_steps_over_the_observation_tokens_by_hand():
    """gamma = lam = 0.5; model tokens at columns 0, 1, 4 (next of 1 is 4). Holes' rewards (5, 7)
    and values (9, 9) and the padding's are never read.

        delta_4 = r_4 + 0            - V_4 = 2   - 1.5         =  0.5
        delta_1 = r_1 + gamma * V_4  - V_1 = 0   + 0.75  - 1.0 = -0.25
        delta_0 = r_0 + gamma * V_1  - V_0 = 1   + 0.5   - 0.5 =  1.0
        A_4 = 0.5
        A_1 = -0.25 + 0.25 * 0.5      = -0.125
        A_0 = 1.0   + 0.25 * (-0.125) =  0.96875
        R = A + V: R_0 = 1.46875, R_1 = 0.875, R_4 = 2.0; 0 at the holes and the padding.
    """
    rewards = torch.tensor([[1.0, 0.0, 5.0, 7.0, 2.0, 11.0]])
    values = torch.tensor([[0.5, 1.0, 9.0, 9.0, 1.5, 13.0]])
    adv, ret = gae_over_holes(rewards, values, MASK, LOSS, gamma=0.5, lam=0.5)
    assert torch.equal(adv, torch.tensor([[0.96875, -0.125, 0.0, 0.0, 0.5, 0.0]]))
    assert torch.equal(ret, torch.tensor([[1.46875, 0.875, 0.0, 0.0, 2.0, 0.0]]))
    ref_adv, ref_ret = gae_with_holes_reference(rewards, values, MASK, LOSS, 0.5, 0.5)
    assert torch.equal(adv, ref_adv) and torch.equal(ret, ref_ret)


def test_discounted_returns_discount_once_per_model_token_by_hand():
    """gamma = 0.5: G_4 = 2; G_1 = 0 + 0.5 * 2 = 1 (not 0.5^3 * 2 over the holes); G_0 = 1 + 0.5 * 1 = 1.5."""
    rewards = torch.tensor([[1.0, 0.0, 5.0, 7.0, 2.0, 11.0]])
    g = discounted_returns_over_holes(rewards, MASK, LOSS, gamma=0.5)
    assert torch.equal(g, torch.tensor([[1.5, 1.0, 0.0, 0.0, 2.0, 0.0]]))


def test_the_registry_s_rewards_skip_the_holes_and_add_the_turn_rewards_by_hand():
    """GAE with gamma = lam = 1, no critic (V = 0), no whitening; beta = 0.5, final score 1, turn 1's
    reward 0.5 on its last model token (column 1); the KL at the holes (3.0) is not charged:

        r_0 = -0.5 * 0.2          = -0.1
        r_1 = -0.5 * 0.4 + 0.5    =  0.3
        r_4 = -0.5 * 0.6 + 1      =  0.7       (the final score on the LAST MODEL token)
        A_4 = 0.7, A_1 = 0.3 + 0.7 = 1.0, A_0 = -0.1 + 1.0 = 0.9; returns = A (V = 0)
    """
    x = AdvantageInputs(scores=torch.tensor([1.0]), kl=torch.tensor([[0.2, 0.4, 3.0, 3.0, 0.6, 0.0]]), mask=MASK,
                        kl_penalty=0.5, group_ids=torch.tensor([0]), values=torch.zeros(1, 6), gamma=1.0, lam=1.0,
                        whiten=False, loss_mask=LOSS, token_rewards=torch.tensor([[0.0, 0.5, 0, 0, 0, 0]]))
    out = registry.get_estimator("gae").fn(x)
    want = torch.tensor([[0.9, 1.0, 0.0, 0.0, 0.7, 0.0]])
    torch.testing.assert_close(out.advantages, want)
    torch.testing.assert_close(out.returns, want)
    # REINFORCE++ (gamma 1): G = [0.9, 1.0, 0.7] over the model tokens: mean 13/15, sample std
    # sqrt(((0.9-13/15)^2 + (1-13/15)^2 + (0.7-13/15)^2) / 2) = sqrt(7/300)
    rpp = registry.get_estimator("reinforce_pp").fn(x).advantages
    m, s = 13 / 15, (7 / 300) ** 0.5
    torch.testing.assert_close(rpp, torch.tensor([[(0.9 - m) / s, (1.0 - m) / s, 0, 0, (0.7 - m) / s, 0]]))


def test_group_estimators_score_a_row_by_final_plus_turn_rewards_by_hand():
    """RLOO over a group of 2: row a scores 1 + 0.5 (its turn reward) = 1.5, row b 1 + 0 = 1:
    A_a = 1.5 - 1 = 0.5, A_b = 1 - 1.5 = -0.5, on the model tokens only. Without the turn rewards
    the group would have zero spread."""
    mask, loss = MASK.repeat(2, 1), LOSS.repeat(2, 1)
    turns = torch.zeros(2, 6)
    turns[0, 1] = 0.5
    x = AdvantageInputs(scores=torch.tensor([1.0, 1.0]), kl=torch.zeros(2, 6), mask=mask, kl_penalty=0.0,
                        group_ids=torch.tensor([0, 0]), loss_mask=loss, token_rewards=turns)
    out = registry.get_estimator("rloo").fn(x)
    assert torch.equal(out.advantages, torch.tensor([[0.5, 0.5, 0, 0, 0.5, 0], [-0.5, -0.5, 0, 0, -0.5, 0]]))
    assert not out.zero_std.any()


def _random_multiturn(seed: int, B: int = 7, T: int = 11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    loss = (torch.rand(B, T, generator=g) < 0.6).to(dtype) * mask
    loss[torch.arange(B), lengths - 1] = 1.0  # every row ends on a model token (its final reward's)
    loss[0] = mask[0]  # and one row is single-turn
    rand = lambda: torch.randn(B, T, generator=g, dtype=dtype)  # noqa: E731
    return mask, loss, rand(), rand()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fast_estimators_agree_with_the_slow_loops_on_random_holes(seed):
    mask, loss, rewards, values = _random_multiturn(seed)
    adv, ret = gae_over_holes(rewards, values, mask, loss, gamma=0.9, lam=0.7)
    ref_adv, ref_ret = gae_with_holes_reference(rewards, values, mask, loss, 0.9, 0.7)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    g = discounted_returns_over_holes(rewards, mask, loss, gamma=0.9)
    ref_g = discounted_returns_with_holes_reference(rewards, mask, loss, 0.9)
    torch.testing.assert_close(g, ref_g)
    # REINFORCE++: the reference returns normalised over the batch's model tokens
    keep = loss.bool()
    mean, std = ref_g[keep].mean(), ref_g[keep].std()
    want = torch.where(keep, (ref_g - mean) / (std + 1e-8), 0.0)
    torch.testing.assert_close(reinforce_pp_over_holes(rewards, mask, loss, 0.9), want)


def test_packing_moves_the_model_tokens_left_and_back():
    h = Holes.of(MASK, LOSS)
    x = torch.tensor([[10.0, 11, 12, 13, 14, 15]])
    assert torch.equal(h.packed_mask, torch.tensor([[1.0, 1, 1, 0, 0, 0]]))
    assert torch.equal(h.pack(x)[:, :3], torch.tensor([[10.0, 11, 14]]))
    assert torch.equal(h.unpack(h.pack(x)), torch.tensor([[10.0, 11, 0, 0, 14, 0]]))


def test_longest_run_is_the_longest_model_turn():
    m = torch.tensor([[1.0, 1, 0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0],
                      [1, 0, 1, 0, 1, 0, 1, 1]])
    assert torch.equal(longest_run(m), torch.tensor([3.0, 4, 0, 2]))
    assert torch.equal(longest_run(m[:1].long()), torch.tensor([3]))


def _today(name: str, x: AdvantageInputs) -> registry.Advantages:
    """The estimators as they were before multi-turn rows (single turn: no holes, no turn rewards)."""
    if name in ("gae", "reinforce_pp"):
        rewards = per_token_rewards(x.scores, x.kl, x.mask, x.kl_penalty)
        if name == "reinforce_pp":
            return registry.Advantages(reinforce_pp_advantages(rewards, x.mask, x.gamma), None, None)
        adv, ret = gae(rewards, x.values, x.mask, x.gamma, x.lam)
        return registry.Advantages(masked_whiten(adv, x.mask) if x.whiten else adv, ret, None)
    fns = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}
    shaped = x.scores - x.kl_penalty * (x.kl * x.mask).sum(1) if x.kl_penalty else x.scores
    return registry.Advantages(fns[name](shaped, x.group_ids, x.mask), None, zero_std_groups(shaped, x.group_ids))


@pytest.mark.parametrize("name", list(registry.ESTIMATORS))
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_single_turn_results_are_bit_identical_to_the_plain_estimators(name, beta):
    """No holes (loss mask = response mask, or None) and zero turn rewards: the same tensors, bit
    for bit, as before multi-turn rows existed -- also through the packing, also in float32."""
    g = torch.Generator().manual_seed(3)
    B, T = 8, 10
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    base = dict(scores=torch.randn(B, generator=g), kl=torch.rand(B, T, generator=g) * mask, mask=mask,
                kl_penalty=beta, group_ids=torch.arange(B) // 2, values=torch.randn(B, T, generator=g) * mask,
                gamma=0.95, lam=0.9)
    want = _today(name, AdvantageInputs(**base))
    for extra in ({}, {"loss_mask": mask.clone(), "token_rewards": torch.zeros(B, T)}):
        got = registry.get_estimator(name).fn(AdvantageInputs(**base, **extra))
        assert torch.equal(got.advantages, want.advantages)
        assert (got.returns is None) == (want.returns is None)
        if want.returns is not None:
            assert torch.equal(got.returns, want.returns)
        if want.zero_std is not None:
            assert torch.equal(got.zero_std, want.zero_std)
    # the packing alone, in every estimator's scan
    assert torch.equal(gae_over_holes(base["kl"], base["values"], mask, mask, 0.95, 0.9)[0],
                       gae(base["kl"], base["values"], mask, 0.95, 0.9)[0])
    assert torch.equal(discounted_returns_over_holes(base["kl"], mask, None, 0.9), discounted_returns(base["kl"], mask, 0.9))
