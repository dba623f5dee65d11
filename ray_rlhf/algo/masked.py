"""Reductions over the valid entries of a masked tensor.

Every function takes ``mask`` of the same shape as ``x`` -- float or bool, 1 / True = a valid
response token, 0 / False = padding. Padding values of ``x`` are never read, so they may hold
anything (even NaN or inf).
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "masked_count",
    "masked_moment_sums",
    "moments_from_sums",
]


def _valid(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with padding set to 0 (so NaN padding cannot leak), and the mask as ``x``'s dtype."""
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(x.shape)}")
    keep = mask.bool()
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), keep.to(x.dtype)


def masked_count(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Number of valid entries, ``sum_i m_i`` (over ``dim``, or over everything if ``None``).

    Shape:
        mask: (B, T) (any shape); returns a scalar, or ``mask`` reduced over ``dim``.
    """
    return mask.bool().sum() if dim is None else mask.bool().sum(dim)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum over valid entries: ``sum_i m_i x_i``.

    Shape:
        x: (B, T) (any shape)
        mask: same as ``x``; 1 = valid
        returns: a scalar if ``dim`` is None, else ``x`` reduced over ``dim``.
    """
    xv, _ = _valid(x, mask)
    return xv.sum() if dim is None else xv.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over valid entries: ``sum_i m_i x_i / sum_i m_i``.

    An all-padding reduction (no valid entry) gives NaN (0 / 0): there is no mean to report.

    Shape:
        x: (B, T) (any shape)
        mask: same as ``x``; 1 = valid
        returns: a scalar if ``dim`` is None, else ``x`` reduced over ``dim``.
    """
    xv, m = _valid(x, mask)
    if dim is None:
        return xv.sum() / m.sum()
    return xv.sum(dim) / m.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all valid entries.

    ``var = sum_i m_i (x_i - mean)^2 / (n - 1)`` with ``n = sum_i m_i`` (Bessel-corrected), or
    divided by ``n`` when ``unbiased=False``.

    Raises ``ValueError`` when there is no valid entry, or only one and ``unbiased=True``.

    Shape:
        x: (B, T) (any shape)
        mask: same as ``x``; 1 = valid
        returns: scalar
    """
    xv, m = _valid(x, mask)
    n = int(m.sum().item())
    if n == 0:
        raise ValueError("masked_var: the mask has no valid entries; there is no variance to compute")
    if unbiased and n == 1:
        raise ValueError("masked_var: unbiased variance needs at least 2 valid entries (got 1); pass unbiased=False")
    mean = xv.sum() / n
    sq = ((xv - mean) * m) ** 2
    return sq.sum() / (n - 1 if unbiased else n)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the valid entries only.

    ``y_i = (x_i - mean) / sqrt(var + eps)`` with mean and (unbiased) variance taken over the
    valid entries (see :func:`masked_var`); with ``shift_mean=False`` the mean is added back,
    ``y_i = (x_i - mean) / sqrt(var + eps) + mean`` (scale only). Padding positions are returned
    as 0. With a single valid entry the variance is taken as 0.

    Used for advantage normalisation in PPO (as in OpenAI baselines' ``ppo2``).

    Shape:
        x: (B, T) (any shape)
        mask: same as ``x``; 1 = valid
        returns: same as ``x``
    """
    xv, m = _valid(x, mask)
    n = int(m.sum().item())
    if n == 0:
        raise ValueError("masked_whiten: the mask has no valid entries; nothing to normalise")
    mean = xv.sum() / n
    var = masked_var(x, mask, unbiased=n > 1)
    y = (xv - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return y * m


def masked_moment_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sums ``[n, sum_i m_i x_i, sum_i m_i x_i^2]`` over valid entries, in float64.

    These add across shards: for rows split over data-parallel ranks, the element-wise sum
    (an ``all_reduce(SUM)``) of each shard's result is the result of the whole batch, from which
    :func:`moments_from_sums` gives the global mean and standard deviation. float64 keeps the
    ``sum x^2 - (sum x)^2 / n`` of :func:`moments_from_sums` accurate for advantage-sized values.

    Shape:
        x: (B, T) (any shape)
        mask: same as ``x``; 1 = valid
        returns: (3,) float64
    """
    xv, m = _valid(x.to(torch.float64), mask)
    return torch.stack([m.sum(), xv.sum(), (xv * xv).sum()])


def moments_from_sums(sums: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation from :func:`masked_moment_sums` (possibly summed over shards).

    ``mean = S1 / n`` and ``std = sqrt((S2 - S1^2 / n) / (n - 1))`` (Bessel-corrected, the
    convention of :func:`masked_var`), or divided by ``n`` when ``unbiased=False``; the
    variance is clamped at 0 against round-off, and taken as 0 when ``n == 1``.

    Raises ``ValueError`` when ``n == 0`` (no valid entry anywhere: there is no mean).

    Shape:
        sums: (3,) ``[n, S1, S2]``
        returns: (mean, std), 0-d float64 tensors
    """
    if sums.shape != (3,):
        raise ValueError(f"sums must be (3,) = [n, sum x, sum x^2] from masked_moment_sums; got {tuple(sums.shape)}")
    sums = sums.to(torch.float64)
    n, s1, s2 = sums[0], sums[1], sums[2]
    if not n > 0:
        raise ValueError("moments_from_sums: n = 0 valid entries (summed over all shards); there is no mean")
    mean = s1 / n
    sq_dev = (s2 - s1 * mean).clamp(min=0.0)  # sum_i (x_i - mean)^2
    denom = (n - 1).clamp(min=1.0) if unbiased else n
    return mean, (sq_dev / denom).sqrt()
