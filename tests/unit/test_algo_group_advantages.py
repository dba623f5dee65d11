"""GRPO, Dr. GRPO and RLOO: hand-computed groups, the slow loops against the fast ones, invariances."""

import math

import pytest
import torch

from ray_rlhf.algo.advantages import dr_grpo_advantages, grpo_advantages, rloo_advantages
from ray_rlhf.algo.groups import group_index, group_moments, zero_std_groups
from tests.reference_math import dr_grpo_advantages_reference, grpo_advantages_reference, rloo_advantages_reference

# Four prompts, interleaved (groups are not contiguous) and of sizes 3, 2, 4, 2:
#   id 7: scores 2, 4, 6          id 3: scores 1, 0 (a group of 2)
#   id 9: scores 1, 0, 0, 0       id 5: scores 0.3, 0.3 (all equal)
IDS = torch.tensor([7, 3, 9, 7, 5, 9, 3, 9, 5, 7, 9])
SCORES = torch.tensor([2.0, 1.0, 1.0, 4.0, 0.3, 0.0, 0.0, 0.0, 0.3, 6.0, 0.0])
LENGTHS = torch.tensor([3, 1, 2, 3, 2, 1, 3, 2, 1, 3, 2])
MASK = (torch.arange(3)[None, :] < LENGTHS[:, None]).float()  # (11, 3), right-padded

# GRPO, sample std (n - 1):
#   id 7: mean 4, std sqrt((4 + 0 + 4) / 2) = 2                      -> A = -1, 0, 1
#   id 3: mean 0.5, std sqrt((0.25 + 0.25) / 1) = sqrt(0.5)           -> A = +-0.5 / 0.7071 = +-0.70710678
#   id 9: mean 0.25, std sqrt((0.5625 + 3 * 0.0625) / 3) = sqrt(0.25) = 0.5 -> A = 1.5, -0.5, -0.5, -0.5
#   id 5: all equal                                                   -> A = 0 (not 0/0 = NaN)
S2 = 1 / math.sqrt(2)  # 0.70710678
GRPO_SEQ = [-1.0, S2, 1.5, 0.0, 0.0, -0.5, -S2, -0.5, 0.0, 1.0, -0.5]
# Dr. GRPO, r - mean: id 7: -2, 0, 2; id 3: 0.5, -0.5; id 9: 0.75, -0.25 x3; id 5: 0
DR_GRPO_SEQ = [-2.0, 0.5, 0.75, 0.0, 0.0, -0.25, -0.5, -0.25, 0.0, 2.0, -0.25]
# RLOO, r_i - mean of the others:
#   id 7: 2 - (4+6)/2 = -3, 4 - (2+6)/2 = 0, 6 - (2+4)/2 = 3
#   id 3: 1 - 0 = 1, 0 - 1 = -1
#   id 9: 1 - (0+0+0)/3 = 1, 0 - (1+0+0)/3 = -1/3
#   id 5: 0.3 - 0.3 = 0
RLOO_SEQ = [-3.0, 1.0, 1.0, 0.0, 0.0, -1 / 3, -1.0, -1 / 3, 0.0, 3.0, -1 / 3]

CASES = [
    ("grpo", lambda s, g, m: grpo_advantages(s, g, m, eps=0.0), GRPO_SEQ),
    ("dr_grpo", dr_grpo_advantages, DR_GRPO_SEQ),
    ("rloo", rloo_advantages, RLOO_SEQ),
]


@pytest.mark.parametrize("name,fn,seq", CASES, ids=[c[0] for c in CASES])
def test_group_estimators_by_hand(name, fn, seq):
    adv = fn(SCORES, IDS, MASK)
    # the sequence advantage on every valid token, 0 on padding
    expected = torch.tensor(seq)[:, None] * MASK
    torch.testing.assert_close(adv, expected)
    assert adv.shape == MASK.shape and adv.dtype == torch.float32
    assert (adv[MASK == 0] == 0).all()
    assert torch.isfinite(adv).all()


def test_grpo_default_eps_and_all_equal_group_with_zero_eps():
    # group of 2 [1, 0] with eps = 1e-6: +-0.5 / (0.70710678 + 1e-6) = +-0.70710578
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 1))
    torch.testing.assert_close(adv, torch.tensor([[0.5 / (S2 + 1e-6)], [-0.5 / (S2 + 1e-6)]]))
    # all-equal scores whose float mean is not exactly the score (0.1 * 3 / 3 != 0.1): still exactly 0
    s = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    for fn in (lambda *a: grpo_advantages(*a, eps=0.0), dr_grpo_advantages, rloo_advantages):
        assert (fn(s, torch.tensor([4, 4, 4]), torch.ones(3, 2)) == 0).all()


def test_zero_std_groups_mask_and_count():
    zero = zero_std_groups(SCORES, IDS)
    torch.testing.assert_close(zero, IDS == 5)  # only prompt 5 has all-equal scores
    assert torch.unique(IDS[zero]).numel() == 1  # the adv/zero_std_groups count
    # binary rewards: prompt 0 all solved, prompt 1 all failed, prompt 2 mixed
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    zero = zero_std_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), ids)
    assert zero.tolist() == [True, True, False, True, True, False]
    assert torch.unique(ids[zero]).numel() == 2


def test_group_moments_by_hand():
    mean, std, size = group_moments(SCORES, IDS)
    assert mean.dtype == torch.float64 and size.dtype == torch.long
    torch.testing.assert_close(mean[:3], torch.tensor([4.0, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(std[:3], torch.tensor([2.0, S2, 0.5], dtype=torch.float64))
    assert size.tolist() == [3, 2, 4, 3, 2, 4, 2, 4, 2, 3, 4]
    inverse, counts = group_index(IDS)  # distinct ids sorted: 3, 5, 7, 9
    assert inverse.tolist() == [2, 0, 3, 2, 1, 3, 0, 3, 1, 2, 3] and counts.tolist() == [2, 2, 3, 4]


@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_one_prompt_does_not_depend_on_the_others(fn):
    # prompt 42 with scores [0.2, 0.9, 0.5]; the other prompts change scores, sizes, ids and order
    mine = torch.tensor([0.2, 0.9, 0.5])
    a_ids = torch.tensor([42, 1, 42, 1, 42, 2, 2])
    a_scores = torch.tensor([mine[0], 5.0, mine[1], -3.0, mine[2], 0.0, 1.0])
    b_ids = torch.tensor([8, 8, 8, 8, 42, 42, 9, 9, 42])
    b_scores = torch.tensor([100.0, -7.0, 3.0, 3.5, mine[0], mine[1], 2.0, 2.0, mine[2]])
    a = fn(a_scores, a_ids, torch.ones(7, 4))[a_ids == 42]
    b = fn(b_scores, b_ids, torch.ones(9, 4))[b_ids == 42]
    torch.testing.assert_close(a, b)
    assert a.abs().sum() > 0


def _random_groups(seed, binary):
    """Ragged groups of sizes 2..6 with random non-contiguous ids, shuffled; ragged masks."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 7, (9,), generator=g)
    ids = torch.randperm(1000, generator=g)[:9]  # arbitrary ids, not 0..G-1
    group_ids = torch.repeat_interleave(ids, sizes)
    B = len(group_ids)
    if binary:  # 0/1 rewards: many all-equal groups
        scores = torch.randint(0, 2, (B,), generator=g).to(torch.float64)
    else:
        scores = torch.randn(B, generator=g, dtype=torch.float64)
    perm = torch.randperm(B, generator=g)
    T = 6
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    return scores[perm], group_ids[perm], mask


PAIRS = [
    (lambda s, g, m: grpo_advantages(s, g, m, eps=1e-6), lambda s, g, m: grpo_advantages_reference(s, g, m, 1e-6)),
    (dr_grpo_advantages, dr_grpo_advantages_reference),
    (rloo_advantages, rloo_advantages_reference),
]


@pytest.mark.parametrize("pair", range(len(PAIRS)), ids=["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_matches_reference_on_random_ragged_shuffled_groups(pair, binary, seed):
    fast, slow = PAIRS[pair]
    scores, group_ids, mask = _random_groups(seed, binary)
    got = fast(scores, group_ids, mask)
    torch.testing.assert_close(got, slow(scores, group_ids, mask), rtol=1e-10, atol=1e-10)
    assert torch.isfinite(got).all() and (got[mask == 0] == 0).all()
    # every group's advantages sum to 0 over its samples (the baseline is the group mean)
    seq = got[:, 0]
    for gid in group_ids.unique():
        assert seq[group_ids == gid].sum().item() == pytest.approx(0.0, abs=1e-9)


def test_rloo_is_scaled_dr_grpo():
    # r_i - (n mean - r_i) / (n - 1) = n / (n - 1) * (r_i - mean)
    scores, group_ids, mask = _random_groups(5, binary=False)
    _, _, n = group_moments(scores, group_ids)
    scale = (n / (n - 1)).to(torch.float64)[:, None]
    dr = dr_grpo_advantages(scores, group_ids, mask)
    torch.testing.assert_close(rloo_advantages(scores, group_ids, mask), scale * dr)


@pytest.mark.parametrize("fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages])
def test_errors_are_actionable(fn):
    with pytest.raises(ValueError, match=r"groups \[5\] have fewer than 2 samples"):
        fn(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 5]), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"sequences \[1\] are not finite"):
        fn(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="integer"):
        fn(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="same B"):
        fn(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(3, 2))
