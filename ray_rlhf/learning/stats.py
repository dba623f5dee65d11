"""What one learner step reports (every field is a ``ppo/<name>`` metric, defined in docs/metrics.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LearnerStats:
    """Diagnostics of one PPO step, over the whole batch (the same at any number of ranks)."""

    version: int
    """Policy version after this update."""
    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float
    ratio_mean: float
    ratio_max: float
    value_clipfrac: float
    explained_variance: float
    grad_norm: float
    kl_ref: float
    kl_beta: float
    lr: float
    sampler_logprob_diff: float
    advantage_mean: float
    return_mean: float
    value_mean: float
    score_mean: float
    response_tokens: int
    prepare_seconds: float
    update_seconds: float
    optimizer_steps: int
    kl_loss: float = 0.0
    zero_std_groups: int = 0
    dropped_sequences: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    is_weight_mean: float = 1.0
    is_weight_max: float = 1.0
    is_truncated_frac: float = 0.0
    staleness_mean: float = 0.0
    staleness_max: int = 0
    mismatch_kl: float = float("nan")
    """k3 KL(pi_sampler || pi_learner_old) over response tokens; NaN when pi_old is the sampler's."""
    correction_truncated_frac: float = 0.0
    """``algo.rollout_correction=tis``: fraction of tokens whose weight was capped."""
    correction_masked_frac: float = 0.0
    """``algo.rollout_correction=mis``: fraction of sequences left out of the loss."""
    overlong_masked: int = 0
    """``rollout.overlong=mask``: truncated sequences left out of the update."""
    overlong_penalty_mean: float = 0.0
    """``rollout.overlong=penalty``: mean penalty added to the scores (0 to -1)."""

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def add(acc: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Key-wise sum (missing keys count as 0)."""
    out = dict(acc)
    for k, v in new.items():
        out[k] = out.get(k, 0.0) + v
    return out
