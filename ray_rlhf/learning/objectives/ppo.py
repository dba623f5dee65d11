"""PPO's objective: the clipped surrogate (+ value loss, KL term, entropy bonus) on scored rollouts.

:meth:`PPOObjective.prepare`, without gradients: the reference log-probs, the values (an estimator
with a critic) and -- unless the sampler's are used (``ppo.old_logprobs``) -- the policy's "old"
log-probs, each rank its rows (:meth:`~ray_rlhf.learning.engine.Engine.gather`, so every rank then
holds the whole batch and every statistic is over the whole batch); then the KL to the reference,
DAPO's overlong penalty, the rollout-correction weights, the advantages of ``algo.estimator``
(:mod:`ray_rlhf.algo.registry`) and the rows left out of the update. :meth:`PPOObjective.loss`, one
micro-batch::

    loss = policy_loss + c1 * value_loss + beta * kl_loss - c2 * entropy

each a sum over the micro-batch's valid tokens divided by the minibatch's (``algo.loss_agg``), so
that micro-batching and ranks do not change the gradient.

Multi-turn rows: the valid tokens of every loss term, count and statistic are the model's own,
``response_mask * loss_mask`` (:attr:`~ray_rlhf.learning.batch.TensorBatch.train_mask`); the
tokens the environment inserted between the turns are attended (the response mask) but carry no
loss, KL, value target or advantage (holes: :mod:`ray_rlhf.algo.holes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ray_rlhf.algo.holes import longest_run
from ray_rlhf.algo.kl import AdaptiveKLController, FixedKLController, kl_estimate
from ray_rlhf.algo.losses import aggregate, dr_grpo_num_tokens, explained_variance, kl_loss, loss_denominators, value_loss
from ray_rlhf.algo.masked import masked_mean
from ray_rlhf.algo.overlong import overlong_penalty
from ray_rlhf.algo.registry import DEFAULT_POLICY_LOSS, AdvantageInputs, Advantages, get_estimator, get_policy_loss
from ray_rlhf.algo.rollout_correction import rollout_correction_weights
from ray_rlhf.config.training import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning.batch import PreparedBatch, TensorBatch
from ray_rlhf.learning.engine import Engine, Forward, Micro
from ray_rlhf.learning.stats import LearnerStats, Stats, stat

nan = math.nan


@dataclass(kw_only=True)
class PPOPrepareStats(Stats):
    """What :meth:`PPOObjective.prepare` measures, over the whole batch (docs/metrics.md)."""

    kl_ref: float = stat("ppo/kl_ref", 0.0)
    sampler_logprob_diff: float = stat("ppo/sampler_logprob_diff", nan)
    advantage_mean: float = stat("ppo/advantage_mean", 0.0)
    return_mean: float = stat("ppo/return_mean", 0.0)
    value_mean: float = stat("ppo/value_mean", nan)
    zero_std_groups: int = stat("adv/zero_std_groups", 0)
    dropped_sequences: int = stat("adv/dropped_sequences", 0)
    overlong_masked: int = stat("rollout/overlong_masked", 0)
    overlong_penalty_mean: float = stat("rollout/overlong_penalty_mean", 0.0)
    mismatch_kl: float = stat("rollout/mismatch_kl", nan)
    """k3 KL(pi_sampler || pi_learner_old) over response tokens; NaN when pi_old is the sampler's."""
    correction_truncated_frac: float = stat("rollout/correction_truncated_frac", 0.0)
    correction_masked_frac: float = stat("rollout/correction_masked_frac", 0.0)
    observation_tokens: int = stat("ppo/observation_tokens", 0)
    """Response tokens the environment inserted between turns (loss mask 0): 0 for single-turn rows."""


@dataclass(kw_only=True)
class PPOLossStats(Stats):
    """One micro-batch's loss terms (token-weighted shares of the minibatch's), and their defaults
    when no update ran (every row left out)."""

    policy_loss: float = stat("ppo/policy_loss", nan)
    value_loss: float = stat("ppo/value_loss", nan)
    """NaN without a critic."""
    value_clipfrac: float = stat("ppo/value_clipfrac", nan)
    kl_loss: float = stat("ppo/kl_loss", 0.0)
    """0 where the KL acts in the reward."""
    entropy: float = stat("ppo/entropy", nan)
    approx_kl: float = stat("ppo/approx_kl", nan)
    clipfrac: float = stat("ppo/clipfrac", nan)
    ratio_mean: float = stat("ppo/ratio_mean", nan)
    ratio_max: float = stat("ppo/ratio_max", nan, reduce="max")
    is_weight_mean: float = stat("ppo/is_weight_mean", 1.0)
    is_weight_max: float = stat("ppo/is_weight_max", 1.0, reduce="max")
    is_truncated_frac: float = stat("ppo/is_truncated_frac", 0.0)


@dataclass(kw_only=True)
class PPOFinishStats(Stats):
    explained_variance: float = stat("ppo/explained_variance", nan)
    kl_beta: float = stat("ppo/kl_beta")
    """The KL coefficient of this step (before the controller's update)."""
    score_mean: float = stat("ppo/score_mean")


@dataclass(kw_only=True)
class PPOStats(PPOPrepareStats, PPOLossStats, PPOFinishStats, LearnerStats):
    """Diagnostics of one PPO step, over the whole batch (the same at any number of ranks)."""


class PPOObjective:
    """PPO (or a critic-free estimator) on a policy, against a frozen reference, with a KL controller."""

    needs_reference = True
    stats_type = PPOStats

    def __init__(self, ppo: PPOConfig, kl: KLConfig, algo: AlgoConfig, *, temperature: float = 1.0,
                 response_budget: int = 32, max_staleness: int = 0, old_logprobs_from_sampler: bool = False,
                 kl_in_loss: bool = False, overlong: str = "keep", overlong_buffer: int = 0):
        self.ppo, self.kl_cfg, self.algo, self.temperature = ppo, kl, algo, temperature
        self.response_budget, self.max_staleness = response_budget, max_staleness
        self.old_logprobs_from_sampler, self.kl_in_loss = old_logprobs_from_sampler, kl_in_loss
        self.overlong, self.overlong_buffer = overlong, overlong_buffer
        self.estimator = get_estimator(algo.estimator)
        self.uses_critic = self.estimator.uses_critic
        self.policy_loss = get_policy_loss(DEFAULT_POLICY_LOSS).fn
        self.kl_ctl = AdaptiveKLController(kl.beta, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.beta)

    # ---- before the update -----------------------------------------------------------------------
    def _passes(self, engine: Engine, mb: TensorBatch, recompute: bool) -> dict[str, torch.Tensor]:
        out = {}
        if recompute or self.uses_critic:
            o = engine.model(*mb.inputs(), temperature=self.temperature, with_entropy=False,
                             with_logprobs=recompute, with_values=self.uses_critic)
            out.update(old_logprobs=o.logprobs, values=o.values)
        out["ref_logprobs"] = engine.reference(*mb.inputs(), temperature=self.temperature)
        return out

    @torch.no_grad()
    def prepare(self, batch: TensorBatch, engine: Engine) -> tuple[PreparedBatch, PPOPrepareStats]:
        """Reference (and old) log-probs, values, the KL to the reference, the advantages and the
        rows left out of the update."""
        b = batch.to(engine.device)
        mask, recompute = b.train_mask, not self.old_logprobs_from_sampler
        names = ("ref_logprobs", *(("old_logprobs",) if recompute else ()), *(("values",) if self.uses_critic else ()))
        passes = engine.gather(b, lambda mb: self._passes(engine, mb, recompute), names)
        old_logprobs = passes["old_logprobs"] if recompute else b.sampler_logprobs
        old_values = passes["values"] * mask if self.uses_critic else None
        kl = kl_estimate(old_logprobs, passes["ref_logprobs"], self.kl_cfg.reward_estimator) * mask
        scores, extra = b.scores, {}
        if self.overlong == "penalty":  # DAPO's soft overlong punishment, added to the score
            # a multi-turn row's longest model turn: each turn is one generation under the budget
            penalty = overlong_penalty(longest_run(mask), self.response_budget, self.overlong_buffer)
            scores, extra["overlong_penalty_mean"] = scores + penalty.to(scores.dtype), float(penalty.mean())
        weights = None
        if recompute:  # the learner's pi_old against the sampler's: the engine mismatch (+ the lag, async)
            w, rc = rollout_correction_weights(old_logprobs, b.sampler_logprobs, mask, self.algo.rollout_correction,
                                               self.algo.rollout_correction_cap,
                                               token_cap=self.ppo.is_cap if self.max_staleness > 0 else None)
            weights = w if self.algo.rollout_correction != "none" else None
            extra.update(mismatch_kl=rc.mismatch_kl, correction_truncated_frac=rc.truncated_frac,
                         correction_masked_frac=rc.masked_frac)
        adv = self.estimator.fn(AdvantageInputs(
            scores=scores, kl=kl, mask=b.response_mask, kl_penalty=0.0 if self.kl_in_loss else self.kl_ctl.value,
            group_ids=b.group_ids, values=old_values, gamma=self.algo.gamma, lam=self.algo.lam,
            whiten=self.algo.whiten_advantages, loss_mask=b.loss_mask, token_rewards=b.token_rewards))
        stats = PPOPrepareStats(
            kl_ref=(kl * mask).sum(dim=1).mean().item(),
            sampler_logprob_diff=masked_mean((old_logprobs - b.sampler_logprobs).abs(), mask).item() if recompute else nan,
            value_mean=masked_mean(old_values, mask).item() if self.uses_critic else nan,
            observation_tokens=int((b.response_mask.sum() - mask.sum()).item()),
            **_advantage_stats(adv, mask, b.group_ids), **extra)
        prepared = PreparedBatch(b, old_logprobs, old_values, passes["ref_logprobs"], adv.advantages, adv.returns, weights)
        return self._drop(prepared, adv, stats)

    def _drop(self, prepared: PreparedBatch, adv: Advantages, stats: PPOPrepareStats):
        """Rows left out of the update: zero-spread groups (``algo.drop_zero_std_groups``) and
        truncated answers (``rollout.overlong=mask``, DAPO's overlong filtering)."""
        b = prepared.batch
        drop = torch.zeros(len(b), dtype=torch.bool, device=b.response_mask.device)
        if self.algo.drop_zero_std_groups and adv.zero_std is not None:
            drop |= adv.zero_std
            stats.dropped_sequences = int(adv.zero_std.sum())
        if self.overlong == "mask":
            drop |= b.truncated.to(drop.device)
            stats.overlong_masked = int(b.truncated.sum())
        if drop.any():
            prepared = prepared.select((~drop).nonzero().flatten())
        return prepared, stats

    # ---- one micro-batch --------------------------------------------------------------------------
    def _denominators(self, mask: torch.Tensor, n_seq: int, real: torch.Tensor):
        """Each row's loss denominator for ``algo.loss_agg`` in a minibatch of ``n_seq`` sequences and
        ``real`` tokens (:func:`~ray_rlhf.algo.losses.loss_denominators`; the two modes with one
        denominator for every row pass it as a scalar, the token mean's sum-then-divide)."""
        agg, budget = self.algo.agg, self.response_budget
        if agg == "token_mean":
            return real
        if agg == "seq_mean_token_sum_norm":
            return dr_grpo_num_tokens(n_seq, budget)
        return loss_denominators(agg, mask.sum(dim=1), n_seq, real, budget)

    def loss(self, micro: Micro[PreparedBatch], forward: Forward) -> tuple[torch.Tensor, PPOLossStats]:
        ppo, prep, mask, real = self.ppo, micro.data, micro.mask, micro.num_tokens
        n_tokens = self._denominators(mask, micro.num_sequences, real)
        out = forward(prep.batch, temperature=self.temperature, with_values=self.uses_critic,
                      entropy_grad=ppo.ent_coef > 0)
        # decoupled PPO: with asynchrony, correct for the sampler's (possibly stale) weights -- unless a
        # rollout correction's weights (prepare) already hold that same ratio pi_old / pi_sampler
        behav = prep.batch.sampler_logprobs if self.max_staleness > 0 and prep.weights is None else None
        pg, pgs = self.policy_loss(out.logprobs, prep.old_logprobs, prep.advantages, mask, clip_eps=ppo.clip,
                                   dual_clip=ppo.dual_clip, num_tokens=n_tokens, behav_logp=behav,
                                   is_cap=self.ppo.is_cap, is_mode=self.ppo.is_mode, clip_low=ppo.clip_lo,
                                   clip_high=ppo.clip_hi, weights=prep.weights)
        loss, terms = pg, {}
        share = float(mask.sum() / real)  # this micro-batch's share of the minibatch's tokens
        if self.uses_critic:
            vf, vfs = value_loss(out.values, prep.old_values, prep.returns, mask, clip_eps=ppo.value_clip,
                                 num_tokens=n_tokens)
            loss = loss + ppo.vf_coef * vf
            terms.update(value_loss=vf.item(), value_clipfrac=vfs.clipfrac * share)
        if self.kl_in_loss:
            kll, _ = kl_loss(out.logprobs, prep.ref_logprobs, mask, self.kl_cfg.loss_estimator, num_tokens=n_tokens)
            loss = loss + self.kl_ctl.value * kll
            terms["kl_loss"] = kll.item()
        entropy = aggregate(out.entropy, mask, num_tokens=real)
        if ppo.ent_coef > 0:
            loss = loss - ppo.ent_coef * aggregate(out.entropy, mask, num_tokens=n_tokens)
        return loss, PPOLossStats(
            policy_loss=pg.item(), entropy=entropy.item(), approx_kl=pgs.approx_kl * share, clipfrac=pgs.clipfrac * share,
            ratio_mean=pgs.ratio_mean * share, ratio_max=pgs.ratio_max, is_weight_mean=pgs.is_weight_mean * share,
            is_weight_max=pgs.is_weight_max, is_truncated_frac=pgs.is_truncated_frac * share, **terms)

    # ---- after the update --------------------------------------------------------------------------
    def finish(self, prepared: PreparedBatch, stats: PPOPrepareStats, batch: TensorBatch) -> PPOFinishStats:
        """The critic's explained variance, and the KL controller's step on this batch's KL."""
        ev = explained_variance(prepared.old_values, prepared.returns, prepared.batch.train_mask) \
            if self.uses_critic else nan
        beta = self.kl_ctl.value
        self.kl_ctl.update(stats.kl_ref, len(batch))
        return PPOFinishStats(explained_variance=float(ev), kl_beta=beta, score_mean=float(batch.scores.mean()))


def _advantage_stats(adv: Advantages, mask: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """``advantage_mean``, ``return_mean`` and ``zero_std_groups`` of one batch."""
    out = {"advantage_mean": masked_mean(adv.advantages, mask).item(),
           "return_mean": masked_mean(adv.returns, mask).item() if adv.returns is not None else 0.0,
           "zero_std_groups": 0}
    if adv.zero_std is not None:
        out["zero_std_groups"] = int(torch.unique(group_ids[adv.zero_std]).numel())
    return out
