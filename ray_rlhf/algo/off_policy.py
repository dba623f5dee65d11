"""Importance weights that correct a PPO update for data sampled by a different (stale) policy.

Three policies meet in an asynchronous or engine-mismatched PPO step:

- the *behaviour* policy ``pi_behav`` that sampled the tokens (the generator's log-probs,
  possibly a few versions old, or the same version computed by a different engine);
- the *proximal* policy ``pi_prox``, the learner's own log-probs of the tokens at the start of
  the update (``old_logp``), the centre of the PPO trust region;
- the policy ``pi`` being optimised.

Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization", the
decoupled objective with a proximal policy; used for asynchronous RL by Fu et al. 2025, "AReaL:
A Large-Scale Asynchronous Reinforcement Learning System for Language Reasoning")::

    L = E_{pi_behav}[ w_t * min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]
    r_t = pi(y_t) / pi_prox(y_t),   w_t = pi_prox(y_t) / pi_behav(y_t)

The weight is bounded by a cap ``C >= 1`` in one of two ways (``mode``):

- ``"truncate"``: ``w_t = min(pi_prox / pi_behav, C)`` -- truncated importance sampling (TIS),
  as in Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
  Training". With ``old_logp`` as the proximal policy, TIS on the usual PPO loss and decoupled
  PPO with a truncated weight are the same formula; they differ only in why ``pi_behav`` differs
  from ``pi_prox`` (inference-engine numerics vs. policy lag).
- ``"mask"``: ``w_t = pi_prox / pi_behav`` if it is ``<= C``, else 0 (the token is dropped) --
  what AReaL's implementation does with its ``behav_imp_weight_cap``.

The weight is a constant (no gradient flows into it). When ``pi_behav == pi_prox`` it is exactly
1.0 and the correction is the identity, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["IS_MODES", "ImportanceWeightStats", "importance_weights"]

IS_MODES = ("truncate", "mask")


@dataclass(frozen=True)
class ImportanceWeightStats:
    """Diagnostics of :func:`importance_weights`, over valid tokens."""

    weight_mean: float
    """Mean of the applied weight ``w_t`` (after truncation / masking): the gradient's scale."""
    weight_max: float
    """Largest raw weight ``pi_prox / pi_behav`` (before the cap): how far off-policy the data is."""
    truncated_frac: float
    """Fraction of valid tokens whose raw weight exceeds the cap (truncated to ``C``, or dropped)."""


def importance_weights(
    old_logp: torch.Tensor,
    behav_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    mode: str = "truncate",
    log_ratio_bound: float = 20.0,
) -> tuple[torch.Tensor, ImportanceWeightStats]:
    """Bounded importance weights ``w_t`` of the proximal over the behaviour policy (see module doc).

    ``log(pi_prox / pi_behav)`` is clamped to ``[-log_ratio_bound, log_ratio_bound]`` before the
    exponential so that the stats stay finite; the weight is 1.0 at padding.

    Shape:
        old_logp: (B, T) log pi_prox(y_t | ...), the learner's log-probs at the start of the update
        behav_logp: (B, T) log pi_behav(y_t | ...), the sampler's log-probs
        mask: (B, T), 1 = valid response token
        returns: (weights (B, T), detached, :class:`ImportanceWeightStats`)
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance-weight mode {mode!r}; valid choices: {', '.join(IS_MODES)}")
    if not (cap >= 1.0 and math.isfinite(cap)):
        raise ValueError(f"importance-weight cap must be a finite number >= 1 (e.g. 2.0 or 5.0); got {cap}")
    if behav_logp.shape != old_logp.shape:
        raise ValueError(
            f"behav_logp must have the shape of old_logp {tuple(old_logp.shape)}; got {tuple(behav_logp.shape)}"
        )
    keep = mask.bool()
    with torch.no_grad():
        log_w = torch.where(keep, old_logp.detach() - behav_logp.detach(), 0.0)
        raw = torch.exp(log_w.clamp(-log_ratio_bound, log_ratio_bound))
        over = keep & (raw > cap)
        if mode == "truncate":
            w = raw.clamp(max=cap)
        else:
            w = torch.where(over, 0.0, raw)
        if keep.any():
            kf = keep.to(torch.float32)
            n = kf.sum()
            s = torch.stack(
                [
                    (w.to(torch.float32) * kf).sum() / n,
                    torch.where(keep, raw, raw.new_tensor(-math.inf)).max().to(torch.float32),
                    over.to(torch.float32).sum() / n,
                ]
            ).tolist()
        else:
            s = [1.0, 1.0, 0.0]
    return w, ImportanceWeightStats(weight_mean=s[0], weight_max=s[1], truncated_frac=s[2])
