"""Generalised advantage estimation over right-padded response tokens.

GAE, Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16 (with the TD residual of eq. 10)::

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}  =  delta_t + gamma * lam * A_{t+1}

The episode ends after the last valid response token: the value after it is 0, and no advantage
flows back from padding. Returns are the lambda-returns ``R_t = A_t + V(s_t)``, the value
targets used by PPO.
"""

from __future__ import annotations

import torch

__all__ = ["gae", "gae_reference", "check_right_padded"]


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


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow, obvious GAE: a pure-Python double loop, one row at a time. For tests.

    For each row with ``n`` valid tokens: ``A_t = sum_{l=0}^{n-1-t} (gamma lam)^l delta_{t+l}``
    with ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``V_n = 0`` (Schulman et al. 2016, eq. 16).

    Shape:
        rewards, values, mask: (B, T); returns (advantages (B, T), returns (B, T))
    """
    _check_shapes(rewards, values, mask)
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
