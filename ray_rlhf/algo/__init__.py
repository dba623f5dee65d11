"""Pure RL math: masked reductions, KL estimators and controllers, advantages, losses, the
off-policy / rollout-correction weights and reward shaping that feed them, and the registry of
estimators and policy losses with what each needs (:mod:`ray_rlhf.algo.registry`).

Imports torch and the standard library only (no Ray, vLLM, transformers or config), so every
function here is a function of tensors that a unit test can check by hand.

The names below are imported on first use (PEP 562), so ``import ray_rlhf.algo.registry`` (the
config's import) does not import torch.
"""

import importlib

_WHERE = {
    **dict.fromkeys((
        "check_right_padded", "discounted_returns", "dr_grpo_advantages", "gae", "grpo_advantages",
        "reinforce_pp_advantages", "rloo_advantages"
    ), "ray_rlhf.algo.advantages"),
    **dict.fromkeys(("group_index", "group_moments", "zero_std_groups"), "ray_rlhf.algo.groups"),
    **dict.fromkeys((
        "Holes", "discounted_returns_over_holes", "gae_over_holes", "longest_run", "model_tokens",
        "reinforce_pp_over_holes"
    ), "ray_rlhf.algo.holes"),
    **dict.fromkeys((
        "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "kl_estimate", "kl_k1", "kl_k2",
        "kl_k3", "per_token_rewards"
    ), "ray_rlhf.algo.kl"),
    **dict.fromkeys((
        "KL_LOSS_CLAMP", "LOG_RATIO_BOUND", "LOSS_AGGS", "KLLossStats", "PolicyLossStats", "ValueLossStats",
        "aggregate", "dr_grpo_num_tokens", "explained_variance", "kl_loss", "loss_denominators",
        "policy_loss", "value_loss"
    ), "ray_rlhf.algo.losses"),
    **dict.fromkeys((
        "masked_count", "masked_mean", "masked_moment_sums", "masked_sum", "masked_var", "masked_whiten",
        "moments_from_sums"
    ), "ray_rlhf.algo.masked"),
    **dict.fromkeys(("IS_MODES", "ImportanceWeightStats", "importance_weights"), "ray_rlhf.algo.off_policy"),
    **dict.fromkeys(("overlong_penalty"), "ray_rlhf.algo.overlong"),
    **dict.fromkeys((
        "DPO_LOSSES", "DPOStats", "PairStats", "bradley_terry_loss", "dpo_loss", "sft_loss"
    ), "ray_rlhf.algo.preference"),
    **dict.fromkeys((
        "ESTIMATORS", "POLICY_LOSSES", "AdvantageInputs", "Advantages", "Estimator", "PolicyLoss",
        "get_estimator", "get_policy_loss", "register_estimator", "register_policy_loss"
    ), "ray_rlhf.algo.registry"),
    **dict.fromkeys((
        "ROLLOUT_CORRECTIONS", "RolloutCorrectionStats", "rollout_correction_weights"
    ), "ray_rlhf.algo.rollout_correction"),
}
"""Each exported name and the module that defines it (imported on first use: the config reads
:mod:`ray_rlhf.algo.registry`'s traits without importing torch)."""


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


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
    "Holes",
    "discounted_returns_over_holes",
    "gae_over_holes",
    "longest_run",
    "model_tokens",
    "reinforce_pp_over_holes",
    "per_token_rewards",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "rollout_correction_weights",
    "value_loss",
    "zero_std_groups",
]
