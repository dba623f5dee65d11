"""Masked reductions and whitening, checked by hand."""

import math

import pytest
import torch

from ray_rlhf.algo.masked import (
    masked_count,
    masked_mean,
    masked_moment_sums,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_from_sums,
)

NAN = math.nan


def test_sum_and_mean_by_hand():
    # valid: row 0 = [1, 2], row 1 = [4]; padding holds junk (100, NaN) that must not leak.
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, NAN, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, mask).item() == 7.0  # 1 + 2 + 4
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))  # 3/2, 4/1
    torch.testing.assert_close(masked_mean(x, mask.bool(), dim=0), torch.tensor([2.5, 2.0, NAN]), equal_nan=True)
    assert masked_count(mask).item() == 3


def test_var_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert masked_var(x, mask).item() == pytest.approx(5.0 / 3.0)  # Bessel: / (4 - 1)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)  # / 4


def test_var_errors_are_actionable():
    with pytest.raises(ValueError, match="no valid entries"):
        masked_var(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="unbiased=False"):
        masked_var(torch.ones(2, 2), torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="does not match"):
        masked_sum(torch.ones(2, 2), torch.ones(2, 3))


def test_whiten_by_hand():
    # valid [1, 2, 3]: mean 2, unbiased var ((-1)^2 + 0 + 1^2) / 2 = 1 -> [-1, 0, 1]; padding -> 0
    x = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(masked_whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False: scale only, mean 2 added back -> [1, 2, 3]
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_whiten_random_ragged_mean0_var1_padding_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64) * 5 + 3
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    x[~mask] = NAN  # padding junk must not leak into the statistics
    y = masked_whiten(x, mask)
    assert masked_mean(y, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(y, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (y[~mask] == 0).all()
    y2 = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(y2, mask).item() == pytest.approx(masked_mean(x, mask).item())
    assert masked_var(y2, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_single_valid_token_is_zero():
    y = masked_whiten(torch.tensor([[5.0, 1.0]]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(y, torch.zeros(1, 2))


def test_moment_sums_and_moments_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    sums = masked_moment_sums(x, mask)
    # n = 4, sum = 1 + 2 + 3 + 4 = 10, sum of squares = 1 + 4 + 9 + 16 = 30
    assert sums.dtype == torch.float64 and sums.tolist() == [4.0, 10.0, 30.0]
    mean, std = moments_from_sums(sums)
    # mean 2.5; sum of squared deviations 30 - 10 * 2.5 = 5; std = sqrt(5 / 3) (Bessel) or sqrt(5 / 4)
    assert mean.item() == 2.5 and std.item() == pytest.approx(math.sqrt(5 / 3))
    assert moments_from_sums(sums, unbiased=False)[1].item() == pytest.approx(math.sqrt(1.25))
    # one valid entry: std 0; none: an error
    assert moments_from_sums(torch.tensor([1.0, 3.0, 9.0]))[1].item() == 0.0
    with pytest.raises(ValueError, match="n = 0"):
        moments_from_sums(masked_moment_sums(x, torch.zeros(1, 5)))


def test_moment_sums_add_across_shards():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, generator=g) * 3 + 1
    mask = torch.arange(9)[None, :] < torch.tensor([9, 1, 4, 7, 2, 5])[:, None]
    x[~mask] = NAN
    shards = [[0, 3], [1], [2, 4, 5]]  # e.g. three data-parallel ranks
    total = sum(masked_moment_sums(x[rows], mask[rows]) for rows in shards)  # the all_reduce(SUM)
    torch.testing.assert_close(total, masked_moment_sums(x, mask))
    mean, std = moments_from_sums(total)
    assert mean.item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-6)
    assert std.item() ** 2 == pytest.approx(masked_var(x, mask).item(), rel=1e-6)
