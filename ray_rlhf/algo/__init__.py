"""Pure RL math: masked reductions, KL estimators and controllers, advantages, losses, the
off-policy / rollout-correction weights and reward shaping that feed them, and the registry of
estimators and policy losses with what each needs (:mod:`ray_rlhf.algo.registry`).

Imports torch and the standard library only (no Ray, vLLM, transformers or config), so every
function here is a function of tensors that a unit test can check by hand.
"""

from ray_rlhf.algo.advantages import (
    check_right_padded,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from ray_rlhf.algo.groups import group_index, group_moments, zero_std_groups
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
    KL_LOSS_CLAMP,
    LOG_RATIO_BOUND,
    LOSS_AGGS,
    KLLossStats,
    PolicyLossStats,
    ValueLossStats,
    aggregate,
    dr_grpo_num_tokens,
    explained_variance,
    kl_loss,
    loss_denominators,
    policy_loss,
    value_loss,
)
from ray_rlhf.algo.masked import (
    masked_count,
    masked_mean,
    masked_moment_sums,
    masked_sum,
    masked_var,
    masked_whiten,
    moments_from_sums,
)
from ray_rlhf.algo.off_policy import IS_MODES, ImportanceWeightStats, importance_weights
from ray_rlhf.algo.overlong import overlong_penalty
from ray_rlhf.algo.preference import DPO_LOSSES, DPOStats, PairStats, bradley_terry_loss, dpo_loss, sft_loss
from ray_rlhf.algo.registry import (
    ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    Advantages,
    Estimator,
    PolicyLoss,
    get_estimator,
    get_policy_loss,
    register_estimator,
    register_policy_loss,
)
from ray_rlhf.algo.rollout_correction import ROLLOUT_CORRECTIONS, RolloutCorrectionStats, rollout_correction_weights

__all__ = [
    "ESTIMATORS",
    "POLICY_LOSSES",
    "AdvantageInputs",
    "Advantages",
    "Estimator",
    "PolicyLoss",
    "get_estimator",
    "get_policy_loss",
    "register_estimator",
    "register_policy_loss",
    "DPO_LOSSES",
    "DPOStats",
    "PairStats",
    "bradley_terry_loss",
    "dpo_loss",
    "sft_loss",
    "IS_MODES",
    "KL_LOSS_CLAMP",
    "LOG_RATIO_BOUND",
    "LOSS_AGGS",
    "ROLLOUT_CORRECTIONS",
    "AdaptiveKLController",
    "FixedKLController",
    "ImportanceWeightStats",
    "KLLossStats",
    "KL_ESTIMATORS",
    "PolicyLossStats",
    "RolloutCorrectionStats",
    "ValueLossStats",
    "aggregate",
    "check_right_padded",
    "discounted_returns",
    "dr_grpo_advantages",
    "dr_grpo_num_tokens",
    "explained_variance",
    "gae",
    "group_index",
    "group_moments",
    "grpo_advantages",
    "importance_weights",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "loss_denominators",
    "masked_count",
    "masked_mean",
    "masked_moment_sums",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "moments_from_sums",
    "overlong_penalty",
    "per_token_rewards",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "rollout_correction_weights",
    "value_loss",
    "zero_std_groups",
]
