"""Losses for supervised fine-tuning and learning from preference pairs.

Four pure functions of tensors, each returning the loss and a small stats record:

- :func:`sft_loss` -- token negative log-likelihood over response (assistant) tokens.
- :func:`bradley_terry_loss` -- the reward-model loss on scalar rewards of a chosen and a
  rejected completion (Ouyang et al. 2022, InstructGPT, eq. 1; Llama-2's margin variant, eq. 2).
- :func:`dpo_loss` -- Direct Preference Optimization (Rafailov et al. 2023, eq. 7), with the
  conservative label smoothing of cDPO (Mitchell 2023) and the IPO loss (Azar et al. 2023, eq. 17).

Imports torch and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ray_rlhf.algo.masked import masked_count, masked_sum

__all__ = [
    "DPO_LOSSES",
    "DPOStats",
    "PairStats",
    "bradley_terry_loss",
    "dpo_loss",
    "sft_loss",
]

DPO_LOSSES = ("sigmoid", "ipo")


def sft_loss(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood over response tokens.

    ``L = -(sum_{b,t} m_bt log p(y_bt | y_<bt, x_b)) / sum_{b,t} m_bt``

    The mean is over all response tokens of the batch (not per sequence, then per batch), so a
    batch split into micro-batches and summed with weights ``n_k / n`` gives the same loss.

    Shape:
        token_logprobs: (B, T) log-probability of each target token under the model.
        mask: (B, T); 1 = a response (assistant) token that is trained on, 0 = prompt or padding.
        returns: a scalar.
    """
    n = masked_count(mask)
    if int(n) == 0:
        raise ValueError("sft_loss: the mask selects no response token")
    return -masked_sum(token_logprobs, mask) / n.to(token_logprobs.dtype)


@dataclass(frozen=True)
class PairStats:
    """Statistics of a batch of (chosen, rejected) reward pairs."""

    accuracy: float
    """Fraction of pairs where the chosen reward exceeds the rejected one (ties count 0)."""
    margin: float
    """Mean of ``r_c - r_r``."""
    chosen: float
    """Mean chosen reward."""
    rejected: float
    """Mean rejected reward."""


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> PairStats:
    with torch.no_grad():
        diff = (chosen - rejected).float()
        return PairStats(
            accuracy=float((diff > 0).float().mean()),
            margin=float(diff.mean()),
            chosen=float(chosen.float().mean()),
            rejected=float(rejected.float().mean()),
        )


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, PairStats]:
    """Bradley-Terry pairwise loss for a reward model.

    ``L = mean_b -log sigmoid(r_c,b - r_r,b - m_b)``  (InstructGPT eq. 1; ``m`` as Llama-2 eq. 2)

    Computed as ``softplus(-(r_c - r_r - m))``, which is stable for large differences.

    Shape:
        chosen_rewards: (B,) scalar reward of each chosen completion.
        rejected_rewards: (B,) of each rejected completion.
        margin: (B,) or None (= 0); how much the chosen should beat the rejected by.
        returns: a scalar loss and :class:`PairStats` of ``r_c``, ``r_r``.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen {tuple(chosen_rewards.shape)} and rejected {tuple(rejected_rewards.shape)} differ")
    z = chosen_rewards - rejected_rewards
    if margin is not None:
        z = z - margin.to(z.dtype)
    return F.softplus(-z).mean(), _pair_stats(chosen_rewards, rejected_rewards)


@dataclass(frozen=True)
class DPOStats:
    """DPO's implicit rewards, with TRL's metric names in mind (``rewards/chosen`` etc.)."""

    chosen: float
    """Mean ``beta * (log pi(y_c|x) - log pi_ref(y_c|x))`` -- ``rewards/chosen``."""
    rejected: float
    """Mean ``beta * (log pi(y_r|x) - log pi_ref(y_r|x))`` -- ``rewards/rejected``."""
    accuracy: float
    """Fraction of pairs with chosen implicit reward > rejected -- ``rewards/accuracies``."""
    margin: float
    """Mean chosen minus rejected implicit reward -- ``rewards/margins``."""


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, DPOStats]:
    """DPO loss on sequence log-probabilities (sums over response tokens).

    ``h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))``

    - ``sigmoid`` (DPO eq. 7, cDPO): ``L = mean -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
    - ``ipo`` (IPO eq. 17): ``L = mean (h - 1/(2 beta))^2``; ``label_smoothing`` is not used.

    Shape:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) summed log-probabilities.
        returns: a scalar loss and :class:`DPOStats`.
    """
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if loss not in DPO_LOSSES:
        raise ValueError(f"dpo loss {loss!r} is not one of {DPO_LOSSES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss == "sigmoid":
        losses = (1 - label_smoothing) * F.softplus(-beta * h) + label_smoothing * F.softplus(beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        rc, rr = beta * chosen_logratio.float(), beta * rejected_logratio.float()
        stats = DPOStats(
            chosen=float(rc.mean()),
            rejected=float(rr.mean()),
            accuracy=float((rc > rr).float().mean()),
            margin=float((rc - rr).mean()),
        )
    return losses.mean(), stats
