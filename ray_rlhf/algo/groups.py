"""Per-group statistics of sequence scores, for the critic-free (group-baseline) estimators.

A *group* is the set of responses sampled for one prompt. ``group_ids`` is an integer tensor
(B,): sequences with the same id belong to the same group. Ids may be any integers, groups may
appear in any order (not necessarily contiguous) and may differ in size; every group used by an
estimator needs at least 2 samples (a baseline from one sample is the sample itself).

Everything here is vectorised with ``torch.unique`` and ``index_add_`` / ``scatter_reduce``
(no Python loop over groups) and computed in float64, so that the (B,) statistics are exact
enough for the fast-vs-reference tests; callers cast back to their dtype.
"""

from __future__ import annotations

import torch

__all__ = ["group_index", "group_moments", "zero_std_groups"]


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group index of each sample and the size of each group.

    ``inverse[i]`` in ``0..G-1`` numbers the distinct ids (in sorted id order), so that
    ``x.new_zeros(G).index_add_(0, inverse, x)`` is the per-group sum of ``x``.

    Shape:
        group_ids: (B,) integer
        returns: (inverse (B,) long, counts (G,) long)
    """
    if group_ids.dim() != 1 or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be a 1-D integer tensor (B,), one prompt id per sequence; "
            f"got shape {tuple(group_ids.shape)} dtype {group_ids.dtype}"
        )
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts


def _check_scores(scores: torch.Tensor, group_ids: torch.Tensor) -> None:
    if scores.dim() != 1 or scores.shape != group_ids.shape:
        raise ValueError(
            f"scores and group_ids must both be (B,); got {tuple(scores.shape)} and {tuple(group_ids.shape)}"
        )
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"scores of sequences {bad} are not finite (NaN or inf); check the reward function")


def group_moments(
    scores: torch.Tensor, group_ids: torch.Tensor, min_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's group mean, group sample standard deviation and group size.

    For group ``g`` with ``n_g`` members::

        mean_g = (1 / n_g) sum_{i in g} r_i
        std_g  = sqrt( sum_{i in g} (r_i - mean_g)^2 / (n_g - 1) )     (Bessel-corrected)

    computed two-pass (deviations from the mean, not ``E[r^2] - E[r]^2``). Raises
    ``ValueError`` naming the ids of groups smaller than ``min_size`` or non-finite scores.

    Shape:
        scores: (B,) sequence-level rewards
        group_ids: (B,) integer
        returns: (mean (B,), std (B,), size (B,)), float64, float64, long; entry i is the
            statistic of the group of sample i
    """
    _check_scores(scores, group_ids)
    inverse, counts = group_index(group_ids)
    small = counts < min_size
    if small.any():
        ids = torch.unique(group_ids)[small].tolist()
        raise ValueError(
            f"groups {ids} have fewer than {min_size} samples; a group baseline needs at least "
            f"{min_size} responses per prompt (raise the number of samples per prompt, or drop these groups)"
        )
    r = scores.to(torch.float64)
    n = counts.to(torch.float64)
    mean = r.new_zeros(len(counts)).index_add_(0, inverse, r) / n
    dev = r - mean[inverse]
    var = r.new_zeros(len(counts)).index_add_(0, inverse, dev * dev) / (n - 1).clamp(min=1)
    return mean[inverse], var.sqrt()[inverse], counts[inverse]


def zero_std_groups(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Which samples belong to a group whose scores are all exactly equal (zero spread).

    Such a group carries no learning signal for a group-baseline estimator: every advantage in
    it is 0. The test is exact (group max == group min), not ``std < tol``, so round-off in the
    mean cannot turn an all-equal group into a tiny non-zero advantage. The number of such
    groups, for the ``adv/zero_std_groups`` metric, is
    ``torch.unique(group_ids[zero_std_groups(scores, group_ids)]).numel()``; to drop them, keep
    the rows where this mask is False.

    Shape:
        scores: (B,); group_ids: (B,) integer; returns (B,) bool
    """
    _check_scores(scores, group_ids)
    inverse, counts = group_index(group_ids)
    r = scores.to(torch.float64)
    g_max = r.new_zeros(len(counts)).scatter_reduce(0, inverse, r, reduce="amax", include_self=False)
    g_min = r.new_zeros(len(counts)).scatter_reduce(0, inverse, r, reduce="amin", include_self=False)
    return (g_max == g_min)[inverse]
