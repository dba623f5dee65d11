"""Pure PPO math: masked reductions, KL estimators and controllers, GAE, losses.

Imports torch and the standard library only (no Ray, vLLM, transformers or config), so every
function here is a function of tensors that a unit test can check by hand.
"""

from ray_rlhf.algo.advantages import check_right_padded, gae, gae_reference
from ray_rlhf.algo.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    per_token_rewards,
)
from ray_rlhf.algo.losses import (
    PolicyLossStats,
    ValueLossStats,
    aggregate,
    entropy_from_logits,
    explained_variance,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)
from ray_rlhf.algo.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_ESTIMATORS",
    "PolicyLossStats",
    "ValueLossStats",
    "aggregate",
    "check_right_padded",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "gae_reference",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "logprobs_from_logits",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "value_loss",
]
