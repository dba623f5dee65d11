"""Advantage estimators over right-padded response tokens: GAE, and the critic-free family.

GAE, Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16 (with the TD residual of eq. 10)::

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}  =  delta_t + gamma * lam * A_{t+1}

The episode ends after the last valid response token: the value after it is 0, and no advantage
flows back from padding. Returns are the lambda-returns ``R_t = A_t + V(s_t)``, the value
targets used by PPO.

Critic-free estimators (no value model): GRPO, Dr. GRPO and RLOO use the other responses to the
same prompt as the baseline of a sequence-level score and broadcast the result to every valid
token; REINFORCE++ uses token-level returns normalised over the whole batch. Groups are given by
``group_ids`` (see :mod:`ray_rlhf.algo.groups`). Every estimator has a slow twin (plain Python
loops) in ``tests/reference_math.py`` that the tests hold it to. All outputs are training targets:
0 at padding, and computed without gradient.
"""

from __future__ import annotations

import torch

from ray_rlhf.algo.groups import group_moments, zero_std_groups
from ray_rlhf.algo.masked import masked_moment_sums, moments_from_sums

__all__ = [
    "gae",
    "check_right_padded",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "discounted_returns",
    "reinforce_pp_advantages",
]


def check_right_padded(mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every row of ``mask`` is ``1...1 0...0`` (right padding).

    Shape:
        mask: (B, T)
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T); got shape {tuple(mask.shape)}")
    m = mask.bool()
    bad = (m[:, 1:] & ~m[:, :-1]).any(-1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"mask rows {bad} are not right-padded (a valid token follows padding); "
            "responses must be right-padded: 1...1 0...0"
        )


def _check_shapes(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            "rewards, values and mask must all be (B, T); got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and lambda-returns (Schulman et al. 2016, eq. 16), a backward scan over T.

    With ``m_t`` the mask: ``delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * m_{t+1} A_{t+1}``, so the value and the advantage after the
    last valid token are 0. ``returns = A + V``. Both outputs are 0 at padding; padding entries
    of ``rewards`` and ``values`` are ignored. Both outputs are training targets: compute them
    under ``torch.no_grad()`` (or detach) so no gradient flows into them.

    Shape:
        rewards: (B, T) per-token rewards (e.g. from ``per_token_rewards``)
        values: (B, T) V(s_t), the value of the state before response token t
        mask: (B, T), 1 = valid response token, right-padded
        returns: (advantages (B, T), returns (B, T))
    """
    _check_shapes(rewards, values, mask)
    check_right_padded(mask)
    keep = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(keep, rewards.to(values.dtype), zero)
    v = torch.where(keep, values, zero)
    B, T = v.shape
    # V_{t+1} with 0 past the end; padding already has v = 0, so m_{t+1} V_{t+1} = next_v.
    next_v = torch.cat([v[:, 1:], v.new_zeros(B, 1)], dim=1)
    deltas = (r + gamma * next_v - v) * keep.to(v.dtype)
    advantages = torch.empty_like(v)
    carry = v.new_zeros(B)  # A_{t+1}, 0 at padding because deltas there are 0
    for t in range(T - 1, -1, -1):
        carry = deltas[:, t] + gamma * lam * carry
        advantages[:, t] = carry
    returns = torch.where(keep, advantages + v, zero)
    return advantages, returns


# ---- critic-free: group baselines ---------------------------------------------------------------


def _check_group_inputs(scores: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 2 or scores.shape != mask.shape[:1]:
        raise ValueError(
            f"scores must be (B,) and mask (B, T) with the same B; got {tuple(scores.shape)} and {tuple(mask.shape)}"
        )


def _broadcast(seq_adv: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T), 0 at padding, in ``scores``' float dtype."""
    dtype = scores.dtype if scores.dtype.is_floating_point else torch.get_default_dtype()
    a = seq_adv.to(dtype=dtype, device=mask.device)
    return torch.where(mask.bool(), a[:, None], torch.zeros((), dtype=dtype, device=mask.device))


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome-supervision advantages: the score standardised within its prompt's group.

    Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models", sec. 4.1.2 (outcome supervision)::

        A_{i,t} = (r_i - mean_g) / (std_g + eps)     for every valid token t of sequence i

    with ``mean_g``, ``std_g`` over the samples of the group ``g`` of sequence i. ``std_g`` is the
    SAMPLE standard deviation (Bessel, ``n_g - 1``), as ``torch.std`` in the reference
    implementations (TRL's ``GRPOTrainer``, verl), so learning rates and ``eps`` carry over; for
    a group of 2 it gives advantages of +-1/sqrt(2) (the population std would give +-1).
    A group whose scores are all equal (:func:`~ray_rlhf.algo.groups.zero_std_groups`) gets
    advantage exactly 0, never NaN, whatever ``eps``. A prompt's advantages depend only on its
    own group. Every group needs >= 2 samples (``ValueError`` otherwise).

    Shape:
        scores: (B,) sequence-level rewards
        group_ids: (B,) integer, equal ids = responses to the same prompt, any order
        mask: (B, T), 1 = valid response token
        returns: (B, T)
    """
    _check_group_inputs(scores, mask)
    mean, std, _ = group_moments(scores, group_ids)
    adv = (scores.to(torch.float64) - mean) / (std + eps)
    adv = torch.where(zero_std_groups(scores, group_ids), 0.0, adv)
    return _broadcast(adv, scores, mask)


@torch.no_grad()
def dr_grpo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO advantages: the group-mean baseline without the std division.

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", section
    "Dr. GRPO: Group Relative Policy Optimization Done Right"::

        A_{i,t} = r_i - mean_g

    Dividing by ``std_g`` up-weights prompts that are nearly always / never solved (a
    question-level difficulty bias); dropping it removes that bias. The paper's other fix, the
    length-unbiased loss aggregation, is done with :func:`~ray_rlhf.algo.losses.dr_grpo_num_tokens`
    as the ``num_tokens`` of the losses. All-equal groups give exactly 0; groups need >= 2 samples.

    Shape:
        scores: (B,); group_ids: (B,) integer; mask: (B, T); returns (B, T)
    """
    _check_group_inputs(scores, mask)
    mean, _, _ = group_moments(scores, group_ids)
    adv = scores.to(torch.float64) - mean
    adv = torch.where(zero_std_groups(scores, group_ids), 0.0, adv)
    return _broadcast(adv, scores, mask)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO advantages: the score minus the mean score of the OTHER samples of the group.

    REINFORCE with a leave-one-out baseline: Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
    Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs" (RLOO)::

        A_{i,t} = r_i - (1 / (n_g - 1)) sum_{j in g, j != i} r_j  =  n_g / (n_g - 1) * (r_i - mean_g)

    The baseline does not depend on r_i, so the estimator is unbiased. All-equal groups give
    exactly 0; groups need >= 2 samples.

    Shape:
        scores: (B,); group_ids: (B,) integer; mask: (B, T); returns (B, T)
    """
    _check_group_inputs(scores, mask)
    mean, _, size = group_moments(scores, group_ids)
    n = size.to(torch.float64)
    r = scores.to(torch.float64)
    adv = r - (n * mean - r) / (n - 1)
    adv = torch.where(zero_std_groups(scores, group_ids), 0.0, adv)
    return _broadcast(adv, scores, mask)


# ---- critic-free: REINFORCE++ -------------------------------------------------------------------


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Token-level discounted return-to-go: ``G_t = sum_{k >= t} gamma^(k - t) r_k`` over valid tokens.

    A backward scan ``G_t = r_t + gamma * G_{t+1}`` with ``G`` = 0 after the last valid token
    (for ``gamma == 1`` a reversed cumulative sum). Padding rewards are ignored; 0 at padding.

    Shape:
        rewards: (B, T) per-token rewards
        mask: (B, T), 1 = valid response token, right-padded
        returns: (B, T)
    """
    if rewards.dim() != 2 or mask.shape != rewards.shape:
        raise ValueError(f"rewards and mask must both be (B, T); got {tuple(rewards.shape)} and {tuple(mask.shape)}")
    check_right_padded(mask)
    keep = mask.bool()
    r = torch.where(keep, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    if gamma == 1.0:
        return r.flip(1).cumsum(1).flip(1) * keep.to(r.dtype)
    out = torch.empty_like(r)
    carry = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        carry = r[:, t] + gamma * carry
        out[:, t] = carry
    return out


@torch.no_grad()
def reinforce_pp_advantages(
    rewards_per_token: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ advantages: discounted token returns, normalised over the whole batch.

    Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"::

        G_t = sum_{k >= t} gamma^(k - t) r_k                  (:func:`discounted_returns`)
        A_t = (G_t - mean_batch(G)) / (std_batch(G) + eps)     over all valid tokens of the batch

    ``rewards_per_token`` is supplied by the caller: typically the outcome score at the last
    valid token plus ``-beta * KL_t`` at every token (:func:`~ray_rlhf.algo.kl.per_token_rewards`).
    ``std`` is the sample (Bessel) std, as in :func:`~ray_rlhf.algo.masked.masked_whiten`.

    The moments are the whole batch's: every learner rank holds the whole prepared batch (the
    learner gathers its forward passes), so no shard ever normalises alone.

    Shape:
        rewards_per_token: (B, T)
        mask: (B, T), 1 = valid response token, right-padded
        returns: (B, T), 0 at padding
    """
    returns = discounted_returns(rewards_per_token, mask, gamma)
    mean, std = moments_from_sums(masked_moment_sums(returns, mask))
    mean = torch.as_tensor(mean, dtype=torch.float64, device=returns.device)
    std = torch.as_tensor(std, dtype=torch.float64, device=returns.device)
    adv = ((returns.to(torch.float64) - mean) / (std + eps)).to(returns.dtype)
    return torch.where(mask.bool(), adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
