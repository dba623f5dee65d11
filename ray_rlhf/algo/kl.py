"""KL penalty: per-token estimators, the KL-shaped per-token reward, and the beta controllers.

Notation: ``logp = log pi(y_t | x, y_<t)`` under the policy that sampled the tokens,
``ref_logp = log pi_ref(y_t | x, y_<t)`` under the frozen reference. Each estimator below is a
function of one sampled token; its expectation under ``pi`` is (k1, k3) or approximates (k2)
``KL(pi || pi_ref)``. Source for k1/k2/k3: J. Schulman, "Approximating KL Divergence" (2020),
http://joschu.net/blog/kl-approx.html, with ``r = pi_ref / pi`` and ``log r = ref_logp - logp``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "KL_ESTIMATORS",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_estimate",
    "per_token_rewards",
    "FixedKLController",
    "AdaptiveKLController",
]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = ``-log r = logp - ref_logp``. Unbiased for KL(pi || ref), high variance, can be < 0.

    Source: Schulman, "Approximating KL Divergence" (k1).

    Shape:
        logp, ref_logp: (B, T); returns (B, T)
    """
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ``0.5 * (log r)^2 = 0.5 * (logp - ref_logp)^2``. Biased, low variance, always >= 0.

    Source: Schulman, "Approximating KL Divergence" (k2).

    Shape:
        logp, ref_logp: (B, T); returns (B, T)
    """
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = ``(r - 1) - log r = exp(ref_logp - logp) - 1 - (ref_logp - logp)``.

    Unbiased for KL(pi || ref), low variance, always >= 0. Computed with ``expm1`` for accuracy
    when ``r`` is near 1.

    Source: Schulman, "Approximating KL Divergence" (k3).

    Shape:
        logp, ref_logp: (B, T); returns (B, T)
    """
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) by the named estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    See :func:`kl_k1`, :func:`kl_k2`, :func:`kl_k3`. Padding is not masked here.

    Shape:
        logp, ref_logp: (B, T); returns (B, T)
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        valid = ", ".join(sorted(KL_ESTIMATORS))
        raise ValueError(f"unknown KL estimator {estimator!r}; valid choices: {valid}") from None
    return fn(logp, ref_logp)


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row. Shape: mask (B, T) -> (B,) long."""
    T = mask.shape[-1]
    return (T - 1) - mask.bool().flip(-1).int().argmax(-1)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """KL-shaped per-token reward of InstructGPT.

    ``R_t = -beta * KL_t`` at every valid response token, plus the sequence score ``r(x, y)``
    at the last valid token of each row; 0 at padding. Summed over a row this is the objective
    ``r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))`` of Ouyang et al. 2022, eq. 2 (without the
    pretraining-mix term; the same reward as Ziegler et al. 2019, eq. 2), with the sequence
    log-ratio split into its per-token terms so that GAE can assign credit per token.

    Every row must have at least one valid token (the score must land somewhere).

    Shape:
        scores: (B,) sequence-level reward-model scores
        kl: (B, T) per-token KL estimate (e.g. from :func:`kl_estimate`); padding ignored
        mask: (B, T), 1 = valid response token, right-padded
        returns: (B, T), same dtype as ``kl``
    """
    if kl.dim() != 2 or mask.shape != kl.shape:
        raise ValueError(f"kl and mask must both be (B, T); got {tuple(kl.shape)} and {tuple(mask.shape)}")
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be (B,) = ({kl.shape[0]},); got {tuple(scores.shape)}")
    keep = mask.bool()
    empty = (~keep.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"per_token_rewards: rows {empty} have no valid response token to carry the score")
    rewards = torch.where(keep, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = _last_valid_index(mask)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


class FixedKLController:
    """Constant KL coefficient ``beta`` (Ziegler et al. 2019, sec. 2.2, fixed-beta variant).

    Attributes:
        value: the current beta (never changes).
    """

    def __init__(self, beta: float):
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"KL beta must be a finite number >= 0; got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: a fixed coefficient does not adapt."""

    def state_dict(self) -> dict[str, float]:
        """``{"value": beta}``."""
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        """Restore ``value`` from :meth:`state_dict`."""
        self.value = float(d["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the observed KL towards ``target``.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2::

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t)

    with ``K_beta = n_steps / horizon`` as in the paper's reference implementation
    (openai/lm-human-preferences; the paper quotes a fixed K_beta = 0.1),
    ``KL_t`` the observed KL(pi || ref) of the latest batch (per sequence, or per token:
    whatever unit ``target`` is in) and ``n_steps`` the number of samples it came from.

    Attributes:
        value: the current beta.
        target: the KL the controller aims for.
        horizon: samples over which a full proportional correction is applied.
    """

    ERROR_CLIP = 0.2

    def __init__(self, init_beta: float, target: float, horizon: float):
        if not (init_beta >= 0 and math.isfinite(init_beta)):
            raise ValueError(f"KL init_beta must be a finite number >= 0; got {init_beta}")
        if not target > 0:
            raise ValueError(f"KL target must be > 0; got {target}")
        if not horizon > 0:
            raise ValueError(f"KL horizon must be > 0; got {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Apply one step of the proportional controller (see class docstring).

        Raises ``ValueError`` for a non-finite ``current_kl`` rather than turning beta into NaN.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl is {current_kl}; expected a finite number")
        error = min(max(current_kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """``{"value": beta}``. ``target`` and ``horizon`` are configuration, not state."""
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        """Restore ``value`` from :meth:`state_dict` (target and horizon stay as constructed)."""
        self.value = float(d["value"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"
