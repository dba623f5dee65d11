"""From scores, KL and values to advantages: the choice of estimator (``algo.estimator``).

The math is in :mod:`ray_rlhf.algo`; this module only picks it and feeds it the whole batch
(every learner rank holds the whole prepared batch, so every statistic -- whitening moments,
group means, REINFORCE++'s normalisation -- is over the whole batch at any number of ranks).

==============  ======================================================  ==========  ===========
estimator       advantage                                               critic      KL (auto)
==============  ======================================================  ==========  ===========
``gae``         GAE over per-token rewards, whitened                    value head  in reward
``grpo``        (r - mean_g) / (std_g + eps), per sequence              none        k3 in loss
``dr_grpo``     r - mean_g, per sequence; loss over B * L_max tokens     none        k3 in loss
``rloo``        r - mean of the other samples of the group              none        k3 in loss
``reinforce_pp``  batch-normalised discounted returns of the rewards    none        in reward
==============  ======================================================  ==========  ===========

With the KL in the reward, a group estimator's score is ``r - beta * sum_t KL_t``; with the KL
in the loss, the reward is the score alone and the loss gains ``beta * k3``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ray_rlhf.algo.advantages import (
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from ray_rlhf.algo.groups import zero_std_groups
from ray_rlhf.algo.kl import per_token_rewards
from ray_rlhf.algo.masked import masked_mean, masked_whiten

GROUP_FUNCTIONS = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}


@dataclass
class Advantages:
    advantages: torch.Tensor
    """Shape (B, T), 0 at padding."""
    returns: torch.Tensor | None
    """Value targets (GAE's lambda-returns), None without a critic. Shape (B, T)."""
    zero_std: torch.Tensor | None
    """Group estimators: which sequences belong to a group whose scores are all equal. Shape (B,)."""


def estimate(estimator: str, *, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
             kl_in_reward: bool, group_ids: torch.Tensor, values: torch.Tensor | None = None,
             gamma: float = 1.0, lam: float = 0.95, whiten: bool = True) -> Advantages:
    """Advantages of one batch under ``estimator`` (the module table).

    Shape: scores (B,), kl (B, T) per-token KL to the reference (0 at padding), mask (B, T),
    group_ids (B,) (samples of one prompt share an id), values (B, T) for ``gae``.
    """
    penalty = beta if kl_in_reward else 0.0
    if estimator == "gae":
        rewards = per_token_rewards(scores, kl, mask, penalty)
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        if whiten:
            advantages = masked_whiten(advantages, mask)
        return Advantages(advantages, returns, None)
    if estimator == "reinforce_pp":
        rewards = per_token_rewards(scores, kl, mask, penalty)
        return Advantages(reinforce_pp_advantages(rewards, mask, gamma), None, None)
    if estimator in GROUP_FUNCTIONS:
        shaped = scores - penalty * (kl * mask).sum(1) if penalty else scores
        return Advantages(GROUP_FUNCTIONS[estimator](shaped, group_ids, mask), None,
                          zero_std_groups(shaped, group_ids))
    raise ValueError(f"unknown estimator {estimator!r}")


def advantage_stats(adv: Advantages, mask: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """``advantage_mean``, ``return_mean`` and ``zero_std_groups`` of one batch."""
    out = {"advantage_mean": masked_mean(adv.advantages, mask).item(),
           "return_mean": masked_mean(adv.returns, mask).item() if adv.returns is not None else 0.0,
           "zero_std_groups": 0}
    if adv.zero_std is not None:
        out["zero_std_groups"] = int(torch.unique(group_ids[adv.zero_std]).numel())
    return out
