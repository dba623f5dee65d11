"""DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2): train only on prompts whose samples differ.

With a group estimator (``grpo``, ``dr_grpo``, ``rloo``) a prompt whose ``n`` samples all got the
same reward has advantage 0 on every token: it adds nothing to the policy gradient and only
dilutes the loss. With ``rollout.dynamic_sampling=true`` a step runs *rounds*: each draws the next
``rollout.prompts_per_step`` prompts of the stream, generates and scores them; the groups with
zero reward spread are discarded, and rounds go on until ``prompts_per_step`` informative groups
are at hand or ``rollout.max_sampling_rounds`` rounds ran. The step trains on the first
``prompts_per_step`` informative groups in the order the stream drew them (later ones are
dropped too: their prompts were consumed, as in DAPO), or -- when the rounds ran out -- on all it
found (:func:`select_informative`).

Reproducible: round 0 samples exactly as a step without dynamic sampling (same seed); round
``r >= 1`` of step ``s`` has its own seed (:func:`round_seed`), never one of a step's, so a
prompt drawn again across an epoch boundary gets fresh samples and no round repeats a step. Each
round draws its prompts from the checkpointed stream, so a step's cursor covers all of its rounds.

Everything here but the task wrapper is plain NumPy on :class:`~ray_rlhf.records.RolloutBatch`;
:func:`keep_informative` runs as a Ray task on the scored batches' ObjectRefs, so the token
arrays never pass through the driver.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ray_rlhf.records import RolloutBatch, RolloutSummary, SamplingSpec

ROUND_STRIDE = 1_000_003
"""Round seeds are ``-(step_seed * ROUND_STRIDE + round)``: distinct for rounds below it."""


def round_seed(step_seed: int, rnd: int) -> int:
    """The base sampling seed of round ``rnd`` (0-based) of the step whose seed is ``step_seed``.

    Round 0 keeps the step's seed (a step whose first round suffices samples exactly what it would
    without dynamic sampling). Round ``r >= 1`` gets ``-(step_seed * ROUND_STRIDE + r)``: step
    seeds are ``seed * 1_000_003 + step >= 1`` (:meth:`SamplingSpec.for_step`), so these are
    negative -- no round ever samples with a step's seed -- and distinct for every (step, round).
    """
    if rnd == 0:
        return step_seed
    if not 0 < rnd < ROUND_STRIDE or step_seed < 1:
        raise ValueError(f"round {rnd} of a step seeded {step_seed}: need 0 <= round < {ROUND_STRIDE}, seed >= 1")
    return -(step_seed * ROUND_STRIDE + rnd)


def round_sampling(step_sampling: SamplingSpec, rnd: int) -> SamplingSpec:
    """The step's sampling with round ``rnd``'s seed (:func:`round_seed`)."""
    if rnd == 0 or step_sampling.seed is None:
        return step_sampling
    return dataclasses.replace(step_sampling, seed=round_seed(step_sampling.seed, rnd))


@dataclass(frozen=True)
class Selection:
    """Which rows of a scored batch dynamic sampling keeps, and the group counts behind it."""

    rows: np.ndarray
    """Indices of the kept rows, in batch order (whole groups). Shape (K,), int64."""
    kept: int
    """Groups kept (at most ``limit``)."""
    informative: int
    """Groups whose rewards are not all equal (kept or beyond ``limit``)."""
    discarded: int
    """Groups whose rewards are all equal (zero variance)."""
    group_rows: np.ndarray
    """Rows of each kept group, in order. Shape (kept,), int64."""


def row_scores(batch: RolloutBatch) -> np.ndarray:
    """Each row's score as a group estimator reads it: the final reward plus the sum of the row's
    per-turn rewards (:attr:`~ray_rlhf.records.RolloutBatch.token_reward`, on its model tokens), in
    float32 as the learner holds them. Shape (N,), float32."""
    reward = batch.reward.astype(np.float32)
    if batch.token_reward is None:
        return reward
    row = np.repeat(np.arange(len(batch)), batch.response_lengths)
    turns = np.zeros(len(batch), np.float32)
    np.add.at(turns, row, np.where(batch.model_mask != 0, batch.token_reward.astype(np.float32), np.float32(0)))
    return reward + turns


def select_informative(batch: RolloutBatch, limit: int) -> Selection:
    """The first ``limit`` groups (in batch order) whose scores are not all equal: a row's score is
    its final reward plus its per-turn rewards (:func:`row_scores`; the final reward alone for
    single-turn rows).

    A group is a prompt's samples: the rows from one ``sample_index == 0`` to the next (a
    generator returns them together, as :func:`ray_rlhf.learning.batch.group_ids` assumes). The
    scores are compared as the learner reads them (float32), exactly (max == min), like
    :func:`ray_rlhf.algo.groups.zero_std_groups`: a kept group never has all-zero advantages.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not len(batch):
        return Selection(np.zeros(0, np.int64), 0, 0, 0, np.zeros(0, np.int64))
    starts = np.flatnonzero(batch.sample_index == 0)
    if not len(starts) or starts[0] != 0:
        raise ValueError("a rollout batch must start with sample 0 of a prompt (groups are contiguous)")
    if not batch.scored:
        raise ValueError("dynamic sampling needs a scored batch (a reward is NaN)")
    reward = row_scores(batch)
    spread = np.maximum.reduceat(reward, starts) != np.minimum.reduceat(reward, starts)
    sizes = np.diff(np.append(starts, len(batch)))
    keep = np.flatnonzero(spread)[:limit]
    group = np.repeat(np.arange(len(starts)), sizes)
    rows = np.flatnonzero(np.isin(group, keep)).astype(np.int64)
    return Selection(rows, len(keep), int(spread.sum()), int((~spread).sum()), sizes[keep].astype(np.int64))


@dataclass(frozen=True)
class RoundsResult:
    """What :func:`keep_informative` reports to the driver (small: no token arrays)."""

    summary: RolloutSummary
    """Of the batch the step trains on."""
    informative: int
    """Informative groups in the rounds so far (before the ``limit``)."""
    discarded: int
    """Zero-variance groups in the rounds so far."""
    kept: int
    """Groups in the batch the step trains on (0: the fallback, the first round's batch as it is)."""


def keep_informative(limit: int, *scored: RolloutBatch) -> tuple[RolloutBatch, RoundsResult]:
    """The batch a dynamic-sampling step trains on, from its rounds' scored batches (in order).

    The first ``limit`` informative groups (:func:`select_informative`; any number of rows: the
    learner's ranks take a minibatch however its rows split over them). With none, the first round's batch
    as it is (its groups all have zero advantages: with ``algo.drop_zero_std_groups`` the learner
    skips the update, else only the KL and entropy terms act), so a step always trains on
    something and the policy version still advances with the step.
    """
    batch = RolloutBatch.concat(scored)
    sel = select_informative(batch, limit)
    out = batch.select(sel.rows) if sel.kept else scored[0]
    return out, RoundsResult(RolloutSummary.of(out), sel.informative, sel.discarded, sel.kept)
