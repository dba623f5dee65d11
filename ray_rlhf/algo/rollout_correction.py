"""Rollout correction: weights for the mismatch between the sampler's and the learner's log-probs.

The inference engine that samples the responses (vLLM, with its own kernels, precision and
batching) and the learner that trains on them compute different probabilities for the same
tokens under the same weights, so even a "synchronous" PPO step is slightly off-policy. Yao et
al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (blog post,
Fengyao), measure the gap and correct it with importance sampling. With
``rho_t = pi_learner(y_t) / pi_sampler(y_t)``, the per-token ratio of the learner's log-probs
(``old_logp``, computed at the start of the update) over the sampler's, both of the sampled token::

    rho_t = exp(clamp(learner_logp_t - sampler_logp_t, -20, 20))       (1 at padding)

the modes of :data:`ROLLOUT_CORRECTIONS` give per-token loss weights ``w_t`` (detached constants,
multiplied on the PPO loss via ``policy_loss(..., weights=w)``):

- ``"none"``: ``w_t = 1`` (only the mismatch is measured);
- ``"tis"``: token-level truncated importance sampling (Yao et al. 2025),
  ``w_t = min(rho_t, C)``;
- ``"mis"``: sequence-level masked importance sampling. The sequence's geometric-mean ratio
  ``g_i = exp(mean_t log rho_it)`` (over valid tokens) decides whether sequence ``i`` is kept:
  if ``g_i`` is outside ``[1/C, C]`` the whole sequence leaves the loss (``w_it = 0``), else its
  tokens get ``w_it = min(rho_it, token_cap)`` (or 1 without ``token_cap``). This is the
  "geometric" sequence-level rejection of verl's and slime's rollout correction (see also Liu et
  al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
  Mismatch", blog post): a length-normalised test that does not reject every long sequence, and
  a hard drop rather than a truncation for sequences the engine got badly wrong.

The diagnostic in every mode is the k3 estimate of ``KL(pi_sampler || pi_learner)`` from the
sampler's samples, ``mean_t (rho_t - 1 - log rho_t)`` (Schulman, "Approximating KL Divergence").

Composition with the decoupled-PPO weight of :mod:`ray_rlhf.algo.off_policy`: at staleness
>= 1 the sampler's log-probs carry the policy-version lag AND the engine mismatch together, and
the decoupled weight ``pi_old / pi_behav`` is the SAME ratio as ``rho`` here (``old_logp`` is
the learner's log-prob at the start of the update, ``behav_logp`` the sampler's). So the two are
never multiplied -- that would count the one ratio twice. Instead the learner computes one
weight here and passes it as ``weights`` (without ``behav_logp``):

- ``"tis"``: one token weight ``min(rho_t, min(is_cap, C))``: pass ``token_cap = is_cap``;
- ``"mis"``: the decoupled token weight truncated at ``is_cap`` is kept inside the kept
  sequences (``token_cap = is_cap``), masked sequences get 0;
- ``"none"``: the decoupled weight of ``policy_loss(..., behav_logp=...)`` applies as before.

At staleness 0 there is no decoupled weight (``token_cap = None``): ``"tis"`` truncates at ``C``,
``"mis"`` keeps weight 1 in the kept sequences.

When ``learner_logp == sampler_logp`` every weight is exactly 1.0 and ``mismatch_kl`` is 0, so
the corrected loss equals plain PPO bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ray_rlhf.algo.kl import kl_k3

__all__ = ["ROLLOUT_CORRECTIONS", "RolloutCorrectionStats", "rollout_correction_weights"]

ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
"""Modes of :func:`rollout_correction_weights`: no weight, token-level TIS, sequence-level MIS."""

_LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class RolloutCorrectionStats:
    """Diagnostics of :func:`rollout_correction_weights`; 0.0 (weight_mean 1.0) with no valid token."""

    mismatch_kl: float
    """k3 estimate of KL(pi_sampler || pi_learner): mean over valid tokens of ``rho - 1 - log rho``."""
    weight_mean: float
    """Mean applied weight ``w_t`` over valid tokens (0 for masked sequences): the gradient's scale."""
    truncated_frac: float
    """Fraction of valid tokens whose ratio exceeds the token cap and is truncated: ``rho > min(C, token_cap)``
    in ``"tis"``, ``rho > token_cap`` in the kept sequences in ``"mis"``; 0.0 in ``"none"``."""
    masked_frac: float
    """Fraction of sequences (with at least one valid token) dropped by ``"mis"``; 0.0 otherwise."""


def rollout_correction_weights(
    learner_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    cap: float,
    token_cap: float | None = None,
) -> tuple[torch.Tensor, RolloutCorrectionStats]:
    """Per-token weights correcting for the sampler / learner mismatch (see the module docstring).

    ::

        rho_t = exp(clamp(learner_logp_t - sampler_logp_t, -20, 20))
        none:  w_t  = 1
        tis:   w_t  = min(rho_t, C, token_cap)                         (token_cap = inf if None)
        mis:   g_i  = exp(sum_t m_it log rho_it / max(sum_t m_it, 1))
               w_it = 0 if g_i < 1/C or g_i > C, else min(rho_it, token_cap) (1 if token_cap is None)

    ``C = cap`` must be finite and > 1; ``token_cap`` (the decoupled-PPO ``is_cap`` at staleness
    >= 1) finite and >= 1, or None; ``"none"`` ignores it. The weights are detached, 1 at padding
    except in a masked sequence, whose whole row is 0; padding values of the inputs (even inf or
    NaN) are never read.

    Shape:
        learner_logp: (B, T) log pi_learner(y_t | ...), the learner's log-probs (``old_logp``)
        sampler_logp: (B, T) log pi_sampler(y_t | ...), the inference engine's log-probs
        mask: (B, T), 1 = valid response token
        returns: (weights (B, T), detached, dtype of ``learner_logp``, :class:`RolloutCorrectionStats`)
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; valid choices: {', '.join(ROLLOUT_CORRECTIONS)}")
    if not (math.isfinite(cap) and cap > 1.0):
        raise ValueError(f"rollout correction cap must be a finite number > 1 (e.g. 2.0); got {cap}")
    if token_cap is not None and not (math.isfinite(token_cap) and token_cap >= 1.0):
        raise ValueError(f"rollout correction token_cap must be a finite number >= 1, or None; got {token_cap}")
    if learner_logp.dim() != 2 or sampler_logp.shape != learner_logp.shape or mask.shape != learner_logp.shape:
        raise ValueError(
            "learner_logp, sampler_logp and mask must all be (B, T); got "
            f"{tuple(learner_logp.shape)}, {tuple(sampler_logp.shape)}, {tuple(mask.shape)}"
        )
    keep = mask.bool()
    with torch.no_grad():
        log_rho = torch.where(keep, learner_logp.detach() - sampler_logp.detach(), 0.0)
        log_rho = log_rho.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        rho = torch.exp(log_rho)
        truncated = torch.zeros_like(keep)
        seq_masked = torch.zeros_like(keep[:, 0])
        if mode == "none":
            w = torch.ones_like(rho)
        elif mode == "tis":
            c = cap if token_cap is None else min(cap, token_cap)
            truncated = keep & (rho > c)
            w = rho.clamp(max=c)
        else:
            n_valid = keep.sum(-1)
            g = torch.exp(log_rho.sum(-1) / n_valid.clamp(min=1).to(log_rho.dtype))  # padding holds log rho = 0
            seq_masked = (n_valid > 0) & ((g < 1.0 / cap) | (g > cap))
            if token_cap is None:
                tok = torch.ones_like(rho)
            else:
                tok = rho.clamp(max=token_cap)
                truncated = keep & (rho > token_cap) & ~seq_masked[:, None]
            w = torch.where(seq_masked[:, None], 0.0, tok)
        stats = _stats(keep, w, log_rho, truncated, seq_masked)
    return w, stats


def _stats(
    keep: torch.Tensor, w: torch.Tensor, log_rho: torch.Tensor, truncated: torch.Tensor, seq_masked: torch.Tensor
) -> RolloutCorrectionStats:
    """Token / sequence means of the diagnostics in one device sync."""
    rows = keep.any(-1)
    if not rows.any():
        return RolloutCorrectionStats(mismatch_kl=0.0, weight_mean=1.0, truncated_frac=0.0, masked_frac=0.0)
    kf = keep.to(torch.float32)
    n = kf.sum()
    k3 = kl_k3(torch.zeros_like(log_rho), log_rho)  # r - 1 - log r with log r = log(pi_learner / pi_sampler)
    s = torch.stack(
        [
            (k3.to(torch.float32) * kf).sum() / n,
            (w.to(torch.float32) * kf).sum() / n,
            truncated.to(torch.float32).sum() / n,
            seq_masked.to(torch.float32).sum() / rows.to(torch.float32).sum(),
        ]
    ).tolist()
    return RolloutCorrectionStats(mismatch_kl=s[0], weight_mean=s[1], truncated_frac=s[2], masked_frac=s[3])
