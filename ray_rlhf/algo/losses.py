"""PPO losses (to minimise), their token aggregation, and the value function's explained variance.

All per-token quantities are (B, T) over response tokens; ``mask`` is (B, T), float or bool,
1 = valid response token, right-padded. Every loss is reduced by :func:`aggregate`: the sum over
valid tokens divided by ``num_tokens``. Pass ``num_tokens`` = the valid-token count of the whole
(global) minibatch when a minibatch is split into micro-batches or data-parallel shards: the
per-piece losses (and their gradients) then sum exactly to the full-minibatch token mean.

``num_tokens`` may also be a (B, 1) tensor of per-row denominators ``N_i``; the reduction is then
``sum_i sum_t m_it x_it / N_i``. :func:`loss_denominators` builds them for the three aggregation
modes of :data:`LOSS_AGGS` (verl's ``loss_agg_mode``): the global token mean, GRPO's per-sequence
token mean, and Dr. GRPO's per-sequence token sum over a constant ``L_max`` (the last is also
``num_tokens = dr_grpo_num_tokens(num_sequences, max_response_len)``). Built from GLOBAL
minibatch sizes, the pieces of any split sum to the whole's loss and gradient in every mode.

Stats records hold plain floats, computed without gradient over this call's valid tokens (token
means, not divided by ``num_tokens``); they are 0.0 when the mask has no valid token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ray_rlhf.algo.choices import LOSS_AGGS
from ray_rlhf.algo.kl import kl_estimate, kl_k3
from ray_rlhf.algo.masked import masked_mean, masked_sum, masked_var
from ray_rlhf.algo.off_policy import importance_weights

__all__ = [
    "KL_LOSS_CLAMP",
    "LOG_RATIO_BOUND",
    "LOSS_AGGS",
    "KLLossStats",
    "PolicyLossStats",
    "ValueLossStats",
    "aggregate",
    "dr_grpo_num_tokens",
    "kl_loss",
    "loss_denominators",
    "policy_loss",
    "value_loss",
    "explained_variance",
]


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | torch.Tensor | None = None
) -> torch.Tensor:
    """Token-sum-then-divide reduction: ``sum_t m_t x_t / N``, or ``sum_i sum_t m_it x_it / N_i``.

    ``N = num_tokens`` when given -- the valid-token count of the GLOBAL batch this piece belongs
    to, so that ``sum_k aggregate(x_k, m_k, N) == aggregate(x, m)`` over any split of the rows into
    minibatches, micro-batches or shards. Otherwise ``N`` is this batch's own valid-token count
    (at least 1, so an all-padding batch gives 0).

    With ``num_tokens`` a (B, 1) tensor, row ``i`` has its own denominator ``N_i`` (see
    :func:`loss_denominators`; each ``N_i`` must be > 0, not checked here to avoid a device sync)::

        L = sum_i (1 / N_i) sum_t m_it x_it,        dL / dx_it = m_it / N_i

    The denominators are constants, cast to ``per_token``'s dtype.

    Shape:
        per_token: (B, T)
        mask: (B, T), 1 = valid response token
        num_tokens: scalar (int, float or 0-d tensor) > 0, or a (B, 1) tensor of per-row N_i
        returns: scalar tensor
    """
    if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() == 2:
        if tuple(num_tokens.shape) != (per_token.shape[0], 1):
            raise ValueError(
                f"per-row num_tokens must have shape (B, 1) = ({per_token.shape[0]}, 1) (one denominator per row, "
                f"see loss_denominators); got {tuple(num_tokens.shape)}"
            )
        rows = masked_sum(per_token, mask, dim=-1)
        return (rows / num_tokens.detach().squeeze(-1).to(device=rows.device, dtype=rows.dtype)).sum()
    total = masked_sum(per_token, mask)
    if num_tokens is None:
        return total / mask.bool().sum().clamp(min=1).to(total.dtype)
    if not isinstance(num_tokens, torch.Tensor) and not num_tokens > 0:
        raise ValueError(f"num_tokens must be > 0 (the global batch's valid-token count); got {num_tokens}")
    return total / num_tokens


def dr_grpo_num_tokens(num_sequences: int, max_response_len: int) -> int:
    """The constant ``num_tokens`` of Dr. GRPO's length-unbiased aggregation: ``B * L_max``.

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO):
    GRPO's per-sequence mean ``(1/|o_i|) sum_t l_{i,t}`` gives a short sequence's tokens more
    weight than a long one's (and under-penalises long wrong answers). Dr. GRPO divides each
    sequence's token SUM by one constant, the generation budget ``L_max``, then averages over
    the ``B`` sequences::

        L = (1/B) sum_i (1/L_max) sum_t m_{i,t} l_{i,t}  =  aggregate(l, m, num_tokens=B * L_max)

    so every valid token has the same weight ``1 / (B L_max)`` whatever its sequence's length,
    and the weight does not depend on the batch's content. ``num_sequences`` is the number of
    sequences of the GLOBAL (mini)batch -- not of one micro-batch or shard -- so the pieces'
    losses and gradients sum to the whole's, as with the token count; ``max_response_len`` is the
    configured generation budget (max new tokens), not the longest response in the batch.

    Returns an int > 0 to pass as ``num_tokens`` to :func:`aggregate`, :func:`policy_loss`,
    :func:`kl_loss`, ...
    """
    if not (num_sequences >= 1 and max_response_len >= 1):
        raise ValueError(
            "dr_grpo_num_tokens needs num_sequences >= 1 (sequences in the global minibatch) and "
            f"max_response_len >= 1 (the generation budget); got {num_sequences}, {max_response_len}"
        )
    return int(num_sequences) * int(max_response_len)




def loss_denominators(
    mode: str,
    row_tokens: torch.Tensor,
    num_sequences: int,
    num_tokens: float | torch.Tensor,
    max_response_len: int,
) -> torch.Tensor:
    """Per-row denominators ``N_i`` that make :func:`aggregate` compute one of :data:`LOSS_AGGS`.

    The rows belong to one piece (micro-batch or data-parallel shard) of a GLOBAL minibatch of
    ``B = num_sequences`` sequences holding ``N = num_tokens`` valid tokens; ``|o_i|`` =
    ``row_tokens[i]`` is row ``i``'s valid-token count and ``L_max = max_response_len`` the
    generation budget (max new tokens). With ``l_it`` the per-token loss::

        "token_mean":              N_i = N                  L = (1/N) sum_i sum_t l_it
        "seq_mean_token_mean":     N_i = B * max(|o_i|, 1)  L = (1/B) sum_i (1/|o_i|) sum_t l_it
        "seq_mean_token_sum_norm": N_i = B * L_max          L = (1/B) sum_i (1/L_max) sum_t l_it

    ``token_mean`` is the global token mean (every token weighs ``1/N``); ``seq_mean_token_mean``
    is GRPO's per-sequence mean (Shao et al. 2024, "DeepSeekMath", eq. 3; a token of a short
    sequence weighs more); ``seq_mean_token_sum_norm`` is Dr. GRPO's length-unbiased form (Liu et
    al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"; equal to
    ``num_tokens=dr_grpo_num_tokens(B, L_max)``). Because every ``N_i`` depends only on the row and
    on global sizes, ``sum_k aggregate(x_k, m_k, loss_denominators(mode, rows of k, ...))`` over
    any split of the minibatch's rows equals the whole minibatch's loss, and so does the gradient.
    An all-padding row contributes 0 in every mode.

    Shape:
        row_tokens: (B_piece,) valid response tokens of each row of this piece (int or float)
        num_tokens: scalar (float, int or 0-d tensor) > 0, the global minibatch's valid-token
            count (used by "token_mean" only)
        returns: (B_piece, 1) float64 on ``row_tokens``' device, to pass as ``num_tokens``
    """
    if mode not in LOSS_AGGS:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid choices: {', '.join(LOSS_AGGS)}")
    if row_tokens.dim() != 1:
        raise ValueError(f"row_tokens must be (B,), one valid-token count per row; got shape {tuple(row_tokens.shape)}")
    if not (num_sequences >= 1 and max_response_len >= 1):
        raise ValueError(
            "loss_denominators needs num_sequences >= 1 (sequences in the GLOBAL minibatch) and "
            f"max_response_len >= 1 (the generation budget); got {num_sequences}, {max_response_len}"
        )
    counts = row_tokens.detach().to(torch.float64)
    if mode == "token_mean":
        if not isinstance(num_tokens, torch.Tensor) and not num_tokens > 0:
            raise ValueError(f"num_tokens must be > 0 (the global minibatch's valid-token count); got {num_tokens}")
        n = torch.as_tensor(num_tokens).detach().to(device=counts.device, dtype=torch.float64)
        den = n.expand_as(counts)
    elif mode == "seq_mean_token_mean":
        den = float(num_sequences) * counts.clamp(min=1.0)
    else:
        den = torch.full_like(counts, float(num_sequences) * float(max_response_len))
    return den.reshape(-1, 1).clone()


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of one :func:`policy_loss` call, as token means over valid tokens."""

    clipfrac: float
    """Fraction of valid tokens where the clipped branch is active (its gradient is 0)."""
    approx_kl: float
    """k3 estimate of KL(pi_old || pi_new): mean of ``r - 1 - log r``, ``r = pi_new / pi_old``."""
    ratio_mean: float
    """Mean of the ratio ``r = pi_new / pi_old``."""
    ratio_max: float
    """Largest ratio over valid tokens."""
    dual_clipfrac: float
    """Fraction of valid tokens where the dual clip caps the loss (0.0 when dual clip is off)."""
    is_weight_mean: float = 1.0
    """Mean applied off-policy weight ``w_t`` (1.0 without ``behav_logp``); see ``off_policy``."""
    is_weight_max: float = 1.0
    """Largest raw weight ``pi_old / pi_behav`` before the cap (1.0 without ``behav_logp``)."""
    is_truncated_frac: float = 0.0
    """Fraction of valid tokens whose raw weight exceeds ``is_cap`` (0.0 without ``behav_logp``)."""


@dataclass(frozen=True)
class KLLossStats:
    """Diagnostics of one :func:`kl_loss` call, over valid tokens."""

    kl_mean: float
    """Token mean of the per-token KL estimate (not divided by ``num_tokens``)."""
    kl_max: float
    """Largest per-token KL estimate."""


@dataclass(frozen=True)
class ValueLossStats:
    """Diagnostics of one :func:`value_loss` call, as token means over valid tokens."""

    clipfrac: float
    """Fraction of valid tokens where the clipped value term is the larger (0.0 without clip)."""
    value_mean: float
    """Mean predicted value V(s_t)."""
    return_mean: float
    """Mean return target R_t."""


LOG_RATIO_BOUND = 20.0
"""Bound on ``|log(pi_new / pi_old)|`` in :func:`policy_loss` (and on the off-policy log-weight)."""

KL_LOSS_CLAMP = 10.0
"""Bound on ``|KL_t|`` per token in :func:`kl_loss` (as verl clamps its low-variance KL)."""


def _token_stats(mask: torch.Tensor, **per_token: torch.Tensor) -> dict[str, float]:
    """Masked means of boolean/float per-token tensors as floats in one device sync; 0.0 if empty."""
    keep = mask.bool()
    if not keep.any():
        return {k: 0.0 for k in per_token}
    means = torch.stack([masked_mean(v.to(torch.float32), keep) for v in per_token.values()])
    return dict(zip(per_token, means.tolist()))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    dual_clip: float | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    *,
    behav_logp: torch.Tensor | None = None,
    is_cap: float = 2.0,
    is_mode: str = "truncate",
    clip_low: float | None = None,
    clip_high: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (to minimise), optionally dual-clipped and off-policy corrected.

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, negated::

        r_t  = exp(clamp(logp_t - old_logp_t, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        l_t  = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t)

    with ``eps_low = clip_low`` and ``eps_high = clip_high``, each defaulting to ``clip_eps``
    (symmetric PPO). DAPO's "clip-higher" (Yu et al. 2025, "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale", sec. 3.1 "Clip-Higher") sets ``eps_high > eps_low``
    (e.g. 0.28 / 0.2) so that low-probability tokens with ``A > 0`` can grow further before the
    clip stops their gradient, which keeps the policy's entropy from collapsing.

    The log-ratio is clamped to +-``LOG_RATIO_BOUND`` = +-20 before the exponential: ``e^20`` =
    4.9e8 (times any sane advantage) is finite in float32 / bfloat16, whereas an unclamped
    log-ratio past ~88 overflows and makes the loss and the gradient inf / NaN. Inside the bound
    nothing changes (bit for bit); a token beyond it contributes a finite loss and NO gradient
    (the clamp is flat there) -- such a token is garbage (a sampler / learner mismatch), and
    the dual clip caps its loss value as well.

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement
    Learning", AAAI 2020, the "Dual-clip PPO" objective ``max(min(r A, clip(r) A), c A)`` for
    ``A < 0``), for ``c = dual_clip > 1``: where ``A_t < 0`` the loss is capped,
    ``l_t = min(l_t, -c A_t) = min(l_t, c |A_t|)``, so a huge ratio on a bad token cannot blow up
    the update.

    Off-policy correction (keyword-only; see :mod:`ray_rlhf.algo.off_policy`): given the
    sampler's ``behav_logp``, ``old_logp`` is the proximal policy and each token's loss is
    multiplied by the detached weight ``w_t = min(pi_old / pi_behav, is_cap)`` (``is_mode=
    "truncate"``: decoupled PPO of Hilton et al. 2022 / AReaL with a truncated weight, which is
    also truncated importance sampling, TIS) or by ``pi_old / pi_behav`` with tokens above
    ``is_cap`` dropped (``is_mode="mask"``, AReaL's implementation). ``l_t <- w_t l_t`` after
    the clip and the dual clip. Without ``behav_logp`` the loss is exactly the plain PPO loss;
    with ``behav_logp == old_logp`` too (w = 1.0).

    Per-token weights (keyword-only ``weights``, e.g. from
    :func:`~ray_rlhf.algo.rollout_correction.rollout_correction_weights`): detached constants
    multiplied on last, after the clip, the dual clip and the ``behav_logp`` weight:
    ``l_t <- w_t l_t``. They are read only at valid tokens; all-ones weights give exactly the
    unweighted loss and gradient.

    The loss is ``aggregate(l, mask, num_tokens)``. ``old_logp``, ``behav_logp`` and
    ``advantages`` are treated as constants (detached); padding entries of all inputs are
    ignored, also in the gradient.

    Shape:
        logp: (B, T) log pi_new(y_t | ...), differentiable
        old_logp: (B, T) log pi_old(y_t | ...): the policy that collected the batch, or the
            proximal policy (the learner's log-probs at the start of the update) with behav_logp
        advantages: (B, T)
        mask: (B, T), 1 = valid response token
        behav_logp: (B, T) log pi_behav(y_t | ...) of the sampler, or None
        weights: (B, T) per-token loss weights (constants), or None
        num_tokens: scalar, or (B, 1) per-row denominators (see :func:`aggregate`)
        returns: (scalar loss, :class:`PolicyLossStats`)
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0; got {clip_eps}")
    if clip_low is not None and not clip_low > 0:
        raise ValueError(f"clip_low must be > 0 (the ratio's lower bound is 1 - clip_low), or None for clip_eps; got {clip_low}")
    if clip_high is not None and not clip_high > 0:
        raise ValueError(f"clip_high must be > 0 (the ratio's upper bound is 1 + clip_high), or None for clip_eps; got {clip_high}")
    if weights is not None and weights.shape != logp.shape:
        raise ValueError(f"weights must have the shape of logp {tuple(logp.shape)}; got {tuple(weights.shape)}")
    eps_low = clip_eps if clip_low is None else clip_low
    eps_high = clip_eps if clip_high is None else clip_high
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable); got {dual_clip}")
    keep = mask.bool()
    old_logp = old_logp.detach()
    # padding is set to r = 1, A = 0 so junk there (inf, NaN) cannot reach the loss or its gradient
    adv = torch.where(keep, advantages.detach(), 0.0)
    log_ratio = torch.where(keep, logp - old_logp, 0.0).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(surr, surr_clipped)
    with torch.no_grad():
        clipped = surr_clipped > surr
    if dual_clip is not None:
        cap = -dual_clip * adv
        with torch.no_grad():
            dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(dual, cap, per_token)
    else:
        dual = torch.zeros_like(clipped)
    is_stats = {}
    if behav_logp is not None:
        w, ws = importance_weights(old_logp, behav_logp, mask, is_cap, is_mode, LOG_RATIO_BOUND)
        per_token = per_token * w
        is_stats = {
            "is_weight_mean": ws.weight_mean,
            "is_weight_max": ws.weight_max,
            "is_truncated_frac": ws.truncated_frac,
        }
    if weights is not None:
        # 1 at padding so junk there (inf, NaN) cannot reach the gradient through the product
        per_token = per_token * torch.where(keep, weights.detach(), 1.0).to(per_token.dtype)
    loss = aggregate(per_token, mask, num_tokens)

    with torch.no_grad():
        r = ratio.detach()
        approx_kl = kl_k3(torch.zeros_like(r), log_ratio.detach())  # k3 with log(pi_new/pi_old)
        s = _token_stats(mask, clipfrac=clipped, approx_kl=approx_kl, ratio_mean=r, dual_clipfrac=dual)
        ratio_max = float(torch.where(keep, r, r.new_tensor(-math.inf)).max()) if keep.any() else 0.0
    return loss, PolicyLossStats(ratio_max=ratio_max, **s, **is_stats)


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k3",
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, KLLossStats]:
    """KL(pi || ref) as a differentiable loss term, as GRPO adds it (instead of a KL reward).

    Shao et al. 2024, "DeepSeekMath", eq. 4, the k3 estimator of Schulman's "Approximating KL
    Divergence" (see :func:`~ray_rlhf.algo.kl.kl_k3`), aggregated like every loss here::

        k3_t = exp(ref_t - logp_t) - 1 - (ref_t - logp_t)
        L    = aggregate(k3, mask, num_tokens),    d k3_t / d logp_t = 1 - exp(ref_t - logp_t)

    The caller adds ``beta * L`` to the policy loss. Note on the gradient (for tokens sampled
    from pi): E[d k3] = E_pi[(1 - ref/pi) d log pi] = d KL(ref || pi), the gradient of the
    *forward* KL; ``"k2"`` (0.5 (logp - ref)^2) gives the gradient of KL(pi || ref); ``"k1"``
    gives a zero-mean gradient. ``ref_logp`` is detached; padding is ignored, also in the gradient.

    Clamp: each token's estimate is clamped to ``[-KL_LOSS_CLAMP, KL_LOSS_CLAMP]`` = [-10, 10]
    before aggregating (as verl clamps its low-variance KL). The k3 gradient
    ``1 - e^(ref - logp)`` grows exponentially where ``ref >> logp`` (a token the policy has
    nearly ruled out but the reference likes): ``ref - logp = 4`` already gives k3 = 49.6 and a
    gradient of -53.6. A clamped token contributes exactly 10 and NO gradient (the clamp is flat
    there); tokens inside the bound are unchanged bit for bit. The stats report clamped values.

    Shape:
        logp: (B, T) log pi(y_t | ...), differentiable
        ref_logp: (B, T) log pi_ref(y_t | ...)
        mask: (B, T), 1 = valid response token
        num_tokens: scalar, or (B, 1) per-row denominators (see :func:`aggregate`)
        returns: (scalar loss, :class:`KLLossStats`)
    """
    keep = mask.bool()
    # padding -> logp = ref = 0 (KL 0) so junk there (inf, NaN) cannot reach the loss or its gradient
    lp = torch.where(keep, logp, 0.0)
    ref = torch.where(keep, ref_logp.detach(), 0.0)
    kl = kl_estimate(lp, ref, estimator).clamp(-KL_LOSS_CLAMP, KL_LOSS_CLAMP)
    loss = aggregate(kl, mask, num_tokens)
    with torch.no_grad():
        k = kl.detach()
        kl_mean = _token_stats(mask, kl=k)["kl"]
        kl_max = float(torch.where(keep, k, k.new_tensor(-math.inf)).max()) if keep.any() else 0.0
    return loss, KLLossStats(kl_mean=kl_mean, kl_max=kl_max)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, ValueLossStats]:
    """Squared-error value loss, optionally clipped around the old values.

    ``l_t = 0.5 (V_t - R_t)^2`` -- the ``L^VF`` term of Schulman et al. 2017, eq. 9. With
    ``clip_eps``, the clipped form of OpenAI baselines' ``ppo2``::

        V_clip = V_old + clip(V - V_old, -eps, eps)
        l_t    = 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    The loss is ``aggregate(l, mask, num_tokens)``. The coefficient ``c1`` of eq. 9 is NOT
    applied here: the caller multiplies by it. ``old_values`` and ``returns`` are detached.

    Shape:
        values: (B, T) V(s_t) from the current value head, differentiable
        old_values: (B, T) V(s_t) at rollout time
        returns: (B, T) targets R_t (e.g. from ``gae``)
        mask: (B, T), 1 = valid response token
        num_tokens: scalar, or (B, 1) per-row denominators (see :func:`aggregate`)
        returns: (scalar loss, :class:`ValueLossStats`)
    """
    old_values = old_values.detach()
    returns = returns.detach()
    sq = (values - returns) ** 2
    if clip_eps is not None:
        if not clip_eps > 0:
            raise ValueError(f"value clip_eps must be > 0 (or None to disable); got {clip_eps}")
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        sq_clipped = (v_clip - returns) ** 2
        with torch.no_grad():
            clipped = sq_clipped > sq
        sq = torch.maximum(sq, sq_clipped)
    else:
        clipped = torch.zeros_like(mask, dtype=torch.bool)
    loss = aggregate(0.5 * sq, mask, num_tokens)
    with torch.no_grad():
        s = _token_stats(mask, clipfrac=clipped, value_mean=values.detach(), return_mean=returns)
    return loss, ValueLossStats(**s)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """Explained variance of the value predictions: ``1 - Var[R - V] / Var[R]`` over valid tokens.

    1 = perfect, 0 = no better than predicting the mean return, < 0 = worse. NaN when
    ``Var[R] == 0`` or there is no valid token. (As in OpenAI baselines' ``explained_variance``.)

    Shape:
        values, returns, mask: (B, T); returns a float
    """
    if not mask.bool().any():
        return math.nan
    values = values.detach()
    returns = returns.detach()
    var_r = float(masked_var(returns, mask, unbiased=False))
    if var_r == 0.0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_r
