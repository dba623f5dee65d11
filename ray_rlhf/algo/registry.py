"""The registry of advantage estimators and policy losses, each with what it needs.

An estimator is one function of an :class:`AdvantageInputs` record that returns
:class:`Advantages`, registered with :func:`register_estimator` and its traits:

================  ======================================================  ======  ======  ======  =========================
name              advantage                                               critic  groups  KL      loss aggregation
================  ======================================================  ======  ======  ======  =========================
``gae``           GAE over per-token rewards, whitened                    yes     no      reward  ``token_mean``
``grpo``          (r - mean_g) / (std_g + eps), per sequence              no      yes     loss    ``token_mean``
``dr_grpo``       r - mean_g, per sequence; loss over B * L_max tokens    no      yes     loss    ``seq_mean_token_sum_norm``
``rloo``          r - mean of the other samples of the group              no      yes     loss    ``token_mean``
``reinforce_pp``  batch-normalised discounted returns of the rewards      no      no      reward  ``token_mean``
================  ======================================================  ======  ======  ======  =========================

Every estimator works on the model's tokens only (``loss_mask``): in a multi-turn row the
tokens the environment inserted between the turns are holes (:mod:`ray_rlhf.algo.holes`) with no
reward, KL, value target or advantage, and GAE / the discounted returns step from one model token
to the next over them. A row's per-turn rewards (``token_rewards``) add to the per-token rewards
where they fall; a group estimator scores a row by its final reward plus their sum. Without holes
and per-turn rewards every result is bit-identical to the single-turn estimators'.

*critic*: a value function is built, trained and saved; *groups*: the samples of one prompt are
compared, so a prompt needs at least 2; *KL*: where the KL to the reference acts under
``kl.placement=auto`` (a per-token reward penalty, or a loss term); *loss aggregation*: the
``algo.loss_agg=auto`` default (:data:`~ray_rlhf.algo.losses.LOSS_AGGS`). With the KL in the
reward a group estimator's score is ``r - beta * sum_t KL_t``; with the KL in the loss the reward
is the score alone.

A policy loss is registered with :func:`register_policy_loss` (today one: PPO's clipped surrogate,
:func:`~ray_rlhf.algo.losses.policy_loss`), with its own aggregation if it has one.

The config (``algo.estimator``'s choices, the ``auto`` defaults, the checks of
``rollout.samples_per_prompt`` and ``model.critic_path``), the learner and the benchmarks read
these traits: no code outside this module compares an estimator's name (a unit test checks). A new
estimator is one function, one registration here and its test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_rlhf.algo.choices import KL_PLACEMENTS, LOSS_AGGS  # noqa: F401 -- KL_PLACEMENTS: also read from here

if TYPE_CHECKING:  # the traits are read without torch (the config imports them); the math imports it
    import torch


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use, for the whole batch. Masks: 1 = valid response token."""

    scores: torch.Tensor
    """Scalar reward per sequence. Shape: (B,)."""
    kl: torch.Tensor
    """Per-token KL to the reference, 0 at padding. Shape: (B, T)."""
    mask: torch.Tensor
    """Shape: (B, T), right-padded."""
    kl_penalty: float
    """beta where the KL acts in the reward, 0 where it acts in the loss."""
    group_ids: torch.Tensor
    """Samples of one prompt share an id. Shape: (B,)."""
    values: torch.Tensor | None = None
    """V(s_t) before the update, for estimators with a critic. Shape: (B, T)."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    """GAE: whiten the advantages over the batch's model tokens."""
    loss_mask: torch.Tensor | None = None
    """1 = a token the model sampled, 0 = a token the environment inserted between the turns of a
    multi-turn row (an observation: a *hole*, :mod:`ray_rlhf.algo.holes`); None = every valid
    response token is the model's (single turn). Shape: (B, T)."""
    token_rewards: torch.Tensor | None = None
    """Per-turn rewards on the last model token of each turn, 0 elsewhere; None = none. Shape: (B, T)."""

    @property
    def model_mask(self) -> torch.Tensor:
        """The model's tokens ``mask * loss_mask`` (``mask`` without a loss mask). Shape: (B, T)."""
        from ray_rlhf.algo.holes import model_tokens

        return model_tokens(self.mask, self.loss_mask)

    def turn_reward_sums(self) -> torch.Tensor | None:
        """Each row's sum of its per-turn rewards (None without them). Shape: (B,)."""
        if self.token_rewards is None:
            return None
        import torch

        zero = torch.zeros((), dtype=self.token_rewards.dtype, device=self.token_rewards.device)
        return torch.where(self.model_mask.bool(), self.token_rewards, zero).sum(1)


@dataclass
class Advantages:
    advantages: torch.Tensor
    """Shape (B, T), 0 at padding."""
    returns: torch.Tensor | None
    """Value targets (GAE's lambda-returns), None without a critic. Shape (B, T)."""
    zero_std: torch.Tensor | None
    """Group estimators: which sequences belong to a group whose scores are all equal. Shape (B,)."""


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator and what it needs."""

    name: str
    fn: Callable[[AdvantageInputs], Advantages]
    uses_critic: bool
    """A value function is built, run, trained and saved."""
    needs_groups: bool
    """It compares the samples of each prompt: ``rollout.samples_per_prompt >= 2``."""
    kl_placement: str
    """Where the KL acts under ``kl.placement=auto`` (:data:`KL_PLACEMENTS`)."""
    loss_agg: str
    """The loss aggregation under ``algo.loss_agg=auto`` (:data:`~ray_rlhf.algo.losses.LOSS_AGGS`)."""


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss; :attr:`fn` has :func:`~ray_rlhf.algo.losses.policy_loss`'s signature."""

    name: str
    target: Callable[..., tuple[torch.Tensor, object]] | str
    """The function, or ``"module:name"`` imported on first use (the built-in one: its module imports torch)."""
    loss_agg: str | None = None
    """Its own aggregation under ``algo.loss_agg=auto``; None: the estimator's."""

    @property
    def fn(self) -> Callable[..., tuple[torch.Tensor, object]]:
        return _resolve(self.target)


def _resolve(target: Callable | str) -> Callable:
    """``target`` itself, or the function ``"module:name"`` names."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


ESTIMATORS: dict[str, Estimator] = {}
"""Every registered estimator by name, in registration order."""
POLICY_LOSSES: dict[str, PolicyLoss] = {}
"""Every registered policy loss by name."""
DEFAULT_POLICY_LOSS = "ppo_clip"


def register_estimator(name: str, *, uses_critic: bool = False, needs_groups: bool = False,
                       kl_placement: str = "reward", loss_agg: str = "token_mean"):
    """Decorator: register ``fn(inputs: AdvantageInputs) -> Advantages`` as estimator ``name``."""
    if name in ESTIMATORS:
        raise ValueError(f"estimator {name!r} is registered twice")
    if kl_placement not in KL_PLACEMENTS or loss_agg not in LOSS_AGGS:
        raise ValueError(f"estimator {name!r}: kl_placement must be one of {KL_PLACEMENTS} (got {kl_placement!r}) "
                         f"and loss_agg one of {LOSS_AGGS} (got {loss_agg!r})")

    def add(fn: Callable[[AdvantageInputs], Advantages]) -> Callable[[AdvantageInputs], Advantages]:
        ESTIMATORS[name] = Estimator(name, fn, uses_critic, needs_groups, kl_placement, loss_agg)
        return fn

    return add


def register_policy_loss(name: str, fn: Callable[..., tuple[torch.Tensor, object]] | str, *,
                         loss_agg: str | None = None) -> PolicyLoss:
    """Register ``fn`` (or ``"module:name"``, imported on first use) as policy loss ``name``."""
    if name in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is registered twice")
    if loss_agg is not None and loss_agg not in LOSS_AGGS:
        raise ValueError(f"policy loss {name!r}: loss_agg must be one of {LOSS_AGGS}; got {loss_agg!r}")
    POLICY_LOSSES[name] = PolicyLoss(name, fn, loss_agg)
    return POLICY_LOSSES[name]


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; registered: {', '.join(ESTIMATORS)}") from None


def get_policy_loss(name: str) -> PolicyLoss:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; registered: {', '.join(POLICY_LOSSES)}") from None


def estimator_names() -> tuple[str, ...]:
    return tuple(ESTIMATORS)


def group_estimators() -> tuple[str, ...]:
    """The estimators that compare the samples of each prompt."""
    return tuple(n for n, e in ESTIMATORS.items() if e.needs_groups)


def critic_estimators() -> tuple[str, ...]:
    """The estimators with a value function."""
    return tuple(n for n, e in ESTIMATORS.items() if e.uses_critic)


def resolve_kl_in_loss(placement: str, estimator: str) -> bool:
    """``kl.placement`` resolved: True for a loss term, False for a per-token reward penalty
    (``auto``: the estimator's)."""
    if placement == "auto":
        return get_estimator(estimator).kl_placement == "loss"
    return placement == "loss"


def resolve_loss_agg(loss_agg: str, estimator: str, policy: str = DEFAULT_POLICY_LOSS) -> str:
    """``algo.loss_agg`` resolved (``auto``: the policy loss's own, else the estimator's)."""
    if loss_agg != "auto":
        return loss_agg
    return get_policy_loss(policy).loss_agg or get_estimator(estimator).loss_agg


# ---- the estimators --------------------------------------------------------------------------


def _token_rewards(x: AdvantageInputs) -> torch.Tensor:
    """Per-token rewards over the model tokens ``k``: ``-beta * KL_t`` at each, the final score at
    the last one (:func:`~ray_rlhf.algo.kl.per_token_rewards`), plus the per-turn rewards; 0 at
    holes and padding. Shape: (B, T)."""
    import torch

    from ray_rlhf.algo.kl import per_token_rewards

    model = x.model_mask
    rewards = per_token_rewards(x.scores, x.kl, model, x.kl_penalty)
    if x.token_rewards is not None:
        zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        rewards = rewards + torch.where(model.bool(), x.token_rewards.to(rewards.dtype), zero)
    return rewards


@register_estimator("gae", uses_critic=True)
def _gae(x: AdvantageInputs) -> Advantages:
    """GAE (Schulman et al. 2016) over the KL-shaped per-token rewards, stepping over the holes,
    whitened over the batch's model tokens."""
    from ray_rlhf.algo.holes import gae_over_holes
    from ray_rlhf.algo.masked import masked_whiten

    advantages, returns = gae_over_holes(_token_rewards(x), x.values, x.mask, x.loss_mask, x.gamma, x.lam)
    if x.whiten:
        advantages = masked_whiten(advantages, x.model_mask)
    return Advantages(advantages, returns, None)


def _grouped(name: str):
    """A group baseline of the sequence scores ``r + sum_turns r_turn`` (minus ``beta * sum_t KL_t``
    over the model tokens with the KL in the reward), broadcast to the model tokens: ``name`` is the
    baseline's function in :mod:`ray_rlhf.algo.advantages` (``(scores, group_ids, mask) -> (B, T)``)."""

    def estimate(x: AdvantageInputs) -> Advantages:
        from ray_rlhf.algo.groups import zero_std_groups

        fn = _resolve(f"ray_rlhf.algo.advantages:{name}")
        model, turns = x.model_mask, x.turn_reward_sums()
        scores = x.scores if turns is None else x.scores + turns.to(x.scores.dtype)
        shaped = scores - x.kl_penalty * (x.kl * model).sum(1) if x.kl_penalty else scores
        return Advantages(fn(shaped, x.group_ids, model), None, zero_std_groups(shaped, x.group_ids))

    return estimate


register_estimator("grpo", needs_groups=True, kl_placement="loss")(_grouped("grpo_advantages"))
register_estimator("dr_grpo", needs_groups=True, kl_placement="loss",
                   loss_agg="seq_mean_token_sum_norm")(_grouped("dr_grpo_advantages"))
register_estimator("rloo", needs_groups=True, kl_placement="loss")(_grouped("rloo_advantages"))


@register_estimator("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs) -> Advantages:
    """REINFORCE++ (Hu 2025): batch-normalised discounted returns of the KL-shaped rewards, over the
    model tokens (holes skipped)."""
    from ray_rlhf.algo.holes import reinforce_pp_over_holes

    return Advantages(reinforce_pp_over_holes(_token_rewards(x), x.mask, x.loss_mask, x.gamma), None, None)


# ---- the policy losses -------------------------------------------------------------------------

register_policy_loss("ppo_clip", "ray_rlhf.algo.losses:policy_loss")
