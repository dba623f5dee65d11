"""Slow, obvious reference forms of the fast math in :mod:`ray_rlhf.algo`, for the tests only.

Each is a plain Python loop (or plain autograd over full tensors) written straight from the
paper's equation, so a test can check the vectorised version against it on random inputs
(STYLE.md, item 3). Nothing in the package calls these.
"""

from __future__ import annotations

import math

import torch

# ---- GAE ----------------------------------------------------------------------------------------


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow, obvious :func:`~ray_rlhf.algo.advantages.gae`: a pure-Python double loop, one row
    at a time.

    For each row with ``n`` valid tokens: ``A_t = sum_{l=0}^{n-1-t} (gamma lam)^l delta_{t+l}``
    with ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``V_n = 0`` (Schulman et al. 2016, eq. 16).

    Shape:
        rewards, values, mask: (B, T); returns (advantages (B, T), returns (B, T))
    """
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            "rewards, values and mask must all be (B, T); got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].bool().sum())
        r = [float(x) for x in rewards[b, :n]]
        v = [float(x) for x in values[b, :n]] + [0.0]
        delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b][t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
            ret[b][t] = adv[b][t] + v[t]
    return (
        torch.tensor(adv, dtype=values.dtype, device=values.device),
        torch.tensor(ret, dtype=values.dtype, device=values.device),
    )


def gae_with_holes_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow, obvious :func:`~ray_rlhf.algo.holes.gae_over_holes`: for each row, the list of its
    model-token columns ``c_0 < c_1 < ...`` (``mask * loss_mask``), then the double loop of
    :func:`gae_reference` over that list -- the next state of ``c_i`` is ``c_{i+1}``, however many
    observation tokens lie between them. 0 at every other column.

    Shape:
        rewards, values, mask, loss_mask: (B, T); returns (advantages (B, T), returns (B, T))
    """
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        cols = [t for t in range(T) if bool(mask[b, t]) and bool(loss_mask[b, t])]
        n = len(cols)
        r = [float(rewards[b, c]) for c in cols]
        v = [float(values[b, c]) for c in cols] + [0.0]
        delta = [r[i] + gamma * v[i + 1] - v[i] for i in range(n)]
        for i, c in enumerate(cols):
            adv[b][c] = sum((gamma * lam) ** l * delta[i + l] for l in range(n - i))
            ret[b][c] = adv[b][c] + v[i]
    return (
        torch.tensor(adv, dtype=values.dtype, device=values.device),
        torch.tensor(ret, dtype=values.dtype, device=values.device),
    )


def discounted_returns_with_holes_reference(
    rewards: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``G_{c_i} = sum_{j >= i} gamma^(j - i) r_{c_j}`` over each row's model-token columns
    ``c_0 < c_1 < ...`` (one discount per model token, none per observation token); 0 elsewhere.

    Shape: rewards, mask, loss_mask (B, T); returns (B, T)
    """
    B, T = rewards.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        cols = [t for t in range(T) if bool(mask[b, t]) and bool(loss_mask[b, t])]
        for i, c in enumerate(cols):
            out[b][c] = sum(gamma ** (j - i) * float(rewards[b, cols[j]]) for j in range(i, len(cols)))
    return torch.tensor(out, dtype=rewards.dtype, device=rewards.device)


# ---- critic-free: group baselines ---------------------------------------------------------------


def _groups_of(scores: torch.Tensor, group_ids: torch.Tensor) -> list[list[float]]:
    """The list of scores of each sample's group (including itself)."""
    ids = group_ids.tolist()
    s = [float(x) for x in scores]
    return [[s[j] for j in range(len(s)) if ids[j] == ids[i]] for i in range(len(s))]


def _broadcast_reference(seq_adv: list[float], scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T), 0 at padding, in ``scores``' float dtype."""
    B, T = mask.shape
    out = [[seq_adv[b] if bool(mask[b, t]) else 0.0 for t in range(T)] for b in range(B)]
    dtype = scores.dtype if scores.dtype.is_floating_point else torch.get_default_dtype()
    return torch.tensor(out, dtype=dtype, device=mask.device).reshape(B, T)


def grpo_advantages_reference(
    scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The slow, obvious :func:`~ray_rlhf.algo.advantages.grpo_advantages`: for each sequence, loop
    over its group; ``(r_i - mean_g) / (std_g + eps)`` with the sample (Bessel) std, 0 for an
    all-equal group.

    Shape:
        scores: (B,); group_ids: (B,) integer; mask: (B, T); returns (B, T)
    """
    adv = []
    for r_i, group in zip((float(x) for x in scores), _groups_of(scores, group_ids)):
        n = len(group)
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        adv.append(0.0 if max(group) == min(group) else (r_i - mean) / (std + eps))
    return _broadcast_reference(adv, scores, mask)


def dr_grpo_advantages_reference(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The slow, obvious :func:`~ray_rlhf.algo.advantages.dr_grpo_advantages`: ``r_i - mean_g``,
    0 for an all-equal group.

    Shape:
        scores: (B,); group_ids: (B,) integer; mask: (B, T); returns (B, T)
    """
    adv = []
    for r_i, group in zip((float(x) for x in scores), _groups_of(scores, group_ids)):
        adv.append(0.0 if max(group) == min(group) else r_i - sum(group) / len(group))
    return _broadcast_reference(adv, scores, mask)


def rloo_advantages_reference(scores: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The slow, obvious :func:`~ray_rlhf.algo.advantages.rloo_advantages`: the baseline summed
    over the others, ``r_i - mean_{j != i} r_j``, 0 for an all-equal group.

    Shape:
        scores: (B,); group_ids: (B,) integer; mask: (B, T); returns (B, T)
    """
    ids = group_ids.tolist()
    s = [float(x) for x in scores]
    adv = []
    for i in range(len(s)):
        others = [s[j] for j in range(len(s)) if ids[j] == ids[i] and j != i]
        equal = all(o == s[i] for o in others)
        adv.append(0.0 if equal else s[i] - sum(others) / len(others))
    return _broadcast_reference(adv, scores, mask)


# ---- critic-free: REINFORCE++ -------------------------------------------------------------------


def reinforce_pp_advantages_reference(
    rewards_per_token: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, eps: float = 1e-8
) -> torch.Tensor:
    """The slow, obvious :func:`~ray_rlhf.algo.advantages.reinforce_pp_advantages` (whole batch):
    ``G_t = sum_{k >= t} gamma^(k - t) r_k`` by loops, then ``(G_t - mean) / (std + eps)`` over
    every valid token of the batch (sample std).

    Shape:
        rewards_per_token, mask: (B, T); returns (B, T), 0 at padding
    """
    B, T = rewards_per_token.shape
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].bool().sum())
        r = [float(x) for x in rewards_per_token[b, :n]]
        for t in range(n):
            ret[b][t] = sum(gamma ** (k - t) * r[k] for k in range(t, n))
    valid = [ret[b][t] for b in range(B) for t in range(T) if bool(mask[b, t])]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((g - mean) ** 2 for g in valid) / max(len(valid) - 1, 1))
    adv = [[(ret[b][t] - mean) / (std + eps) if bool(mask[b, t]) else 0.0 for t in range(T)] for b in range(B)]
    return torch.tensor(adv, dtype=rewards_per_token.dtype, device=rewards_per_token.device)


# ---- token log-probs and entropy ----------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each chosen token: ``log softmax(logits)[tokens]``.

    The plain autograd form the tests hold the learner's fused, chunked
    :func:`~ray_rlhf.algo.token_logprobs.token_logprobs_and_entropy` to.

    Shape:
        logits: (B, T, V)
        tokens: (B, T) integer token ids
        returns: (B, T)
    """
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1).long()).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: ``H = -sum_v p_v log p_v``.

    The plain autograd form (see :func:`logprobs_from_logits`). Computed from ``log_softmax`` (a
    logsumexp), so large logits do not overflow; ``-inf`` logits (banned tokens) contribute 0 and
    give no NaN gradient.

    Shape:
        logits: (B, T, V)
        returns: (B, T)
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
