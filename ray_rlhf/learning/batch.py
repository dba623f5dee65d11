"""The learner's view of a rollout batch: padded tensors, and what PPO fixes before the update.

:func:`collate` turns a scored :class:`~ray_rlhf.records.RolloutBatch` (flat arrays with
offsets) into a :class:`TensorBatch` with one scatter per column (:func:`ray_rlhf.records.pad_ragged`):
no Python loop over sequences or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ray_rlhf.records import RolloutBatch, pad_ragged


@dataclass
class TensorBatch:
    """A rollout batch as padded tensors. Masks: 1 = real token."""

    prompt_ids: torch.Tensor
    """Shape: (B, P), LEFT-padded."""
    prompt_mask: torch.Tensor
    """Shape: (B, P)."""
    response_ids: torch.Tensor
    """Shape: (B, T), RIGHT-padded."""
    response_mask: torch.Tensor
    """Shape: (B, T), float."""
    sampler_logprobs: torch.Tensor
    """Sampler's logprob of each response token. Shape: (B, T), 0 at padding."""
    scores: torch.Tensor
    """Scalar reward per sequence. Shape: (B,)."""
    policy_versions: torch.Tensor
    """Policy version each sequence was sampled with. Shape: (B,)."""
    prompt_index: torch.Tensor
    """Dataset index of each sequence's prompt. Shape: (B,)."""
    group_ids: torch.Tensor
    """Group of each sequence: the samples of one prompt of this step (a prompt drawn twice in a
    step, across an epoch boundary, makes two groups). Shape: (B,)."""
    truncated: torch.Tensor
    """True where the sequence was cut off at the length limit without EOS (``finish_reason ==
    "length"``, :attr:`~ray_rlhf.records.RolloutBatch.truncated`): its reward judges an unfinished
    answer (DAPO's overlong filtering masks such rows). Shape: (B,), bool."""
    loss_mask: torch.Tensor
    """1 where the response token is the model's own (sampled), 0 at padding and at tokens appended
    between turns (observations, template tokens) of a multi-turn trajectory: equal to
    ``response_mask`` for single-turn rows. ``response_mask`` stays the attention mask.
    Shape: (B, T), float."""
    token_rewards: torch.Tensor
    """Per-turn environment rewards on the last model token of each turn, 0 elsewhere
    (:attr:`~ray_rlhf.records.RolloutBatch.token_reward`). Shape: (B, T), float."""

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, idx: torch.Tensor) -> TensorBatch:
        return TensorBatch(**{k: v[idx] for k, v in self.__dict__.items()})

    def to(self, device: str | torch.device) -> TensorBatch:
        return TensorBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's inputs: ``(prompt_ids, prompt_mask, response_ids, response_mask)``."""
        return self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask

    @property
    def train_mask(self) -> torch.Tensor:
        """The tokens every loss, count and statistic of the learner runs over: ``response_mask *
        loss_mask``, the model's own response tokens (``response_mask`` itself, value for value, for
        single-turn rows). Shape: (B, T), float."""
        return self.response_mask * self.loss_mask

    @property
    def lengths(self) -> torch.Tensor:
        """Real (prompt + response) tokens of each sequence. Shape: (B,)."""
        return self.prompt_mask.sum(1) + self.response_mask.sum(1).long()

    def trimmed(self) -> TensorBatch:
        """The same rows without the padding columns no row needs: the longest prompt's width on
        the left, the longest response's on the right (at least one column each). Positions and
        the attention of every real token are unchanged."""
        p = max(int(self.prompt_mask.sum(1).max()), 1)
        t = max(int(self.response_mask.sum(1).max()), 1)
        out = {}
        for k, v in self.__dict__.items():
            if k.startswith("prompt_") and v.dim() == 2:
                out[k] = v[:, v.shape[1] - p:]
            elif v.dim() == 2:
                out[k] = v[:, :t]
            else:
                out[k] = v
        return TensorBatch(**out)


def partition_rows(lengths: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Split rows over ``world_size`` ranks balanced by tokens (longest first, each to the rank
    with the fewest tokens so far; ties to the lower rank). Deterministic: every rank computes the
    same partition. With at least ``world_size`` rows every rank gets one. Each part keeps the
    rows' original order.

    Shape: lengths (N,) -> ``world_size`` index tensors.
    """
    if world_size == 1:
        return [torch.arange(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    load = [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        parts[r].append(i)
        load[r] += int(lengths[i])
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def micro_batches(rows: torch.Tensor, lengths: torch.Tensor, max_rows: int,
                  budget_tokens: int | None = None) -> list[torch.Tensor]:
    """Micro-batches of ``rows`` (indices), each one forward/backward pass.

    Without a token budget: consecutive chunks of ``max_rows`` rows, in the given order. With
    ``budget_tokens``: rows sorted by length (longest first) and packed while (rows x longest row)
    stays within the budget -- padded work close to the real tokens; a row longer than the budget
    gets a pass of its own. ``lengths`` is indexed by row.
    """
    if budget_tokens is None:
        return list(rows.split(max_rows)) if len(rows) else []
    order = sorted(rows.tolist(), key=lambda i: (-int(lengths[i]), i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * int(lengths[out[-1][0]]) <= budget_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return [torch.tensor(m, dtype=torch.long) for m in out]


def collate(batch: RolloutBatch, pad_id: int) -> TensorBatch:
    """Pad a scored batch into a :class:`TensorBatch` (prompts left-padded, responses right-padded)."""
    if not len(batch):
        raise ValueError("empty rollout batch")
    if not batch.scored:
        raise ValueError("every rollout must be scored before the learner sees it")
    prompt_ids, prompt_mask = pad_ragged(batch.prompt_ids.astype(np.int64), batch.prompt_offsets, pad_id, left=True)
    response_ids, response_mask = pad_ragged(batch.response_ids.astype(np.int64), batch.response_offsets, pad_id)
    logprobs, _ = pad_ragged(batch.sampler_logprobs.astype(np.float32), batch.response_offsets, 0.0)
    model, _ = pad_ragged(batch.model_mask.astype(np.float32), batch.response_offsets, 0.0)
    token_rewards, _ = pad_ragged(batch.token_rewards.astype(np.float32), batch.response_offsets, 0.0)
    return TensorBatch(
        prompt_ids=torch.from_numpy(prompt_ids),
        prompt_mask=torch.from_numpy(prompt_mask.astype(np.int64)),
        response_ids=torch.from_numpy(response_ids),
        response_mask=torch.from_numpy(response_mask.astype(np.float32)),
        sampler_logprobs=torch.from_numpy(logprobs),
        scores=torch.from_numpy(batch.reward.astype(np.float32)),
        policy_versions=torch.from_numpy(batch.policy_version.astype(np.int64)),
        prompt_index=torch.from_numpy(batch.prompt_index.astype(np.int64)),
        group_ids=torch.from_numpy(group_ids(batch)),
        truncated=torch.from_numpy(batch.truncated.astype(np.bool_)),
        loss_mask=torch.from_numpy(model * response_mask.astype(np.float32)),
        token_rewards=torch.from_numpy(token_rewards),
    )


def group_ids(batch: RolloutBatch) -> np.ndarray:
    """Group id of every row: a new group starts at each sample 0 (a generator returns a prompt's
    ``n`` samples together, in order, and a shard is re-queued whole). Shape: (N,), int64."""
    if len(batch) and batch.sample_index[0] != 0:
        raise ValueError("a rollout batch must start with sample 0 of a prompt (groups are contiguous)")
    return np.cumsum(batch.sample_index == 0).astype(np.int64) - 1


@dataclass
class PreparedBatch:
    """A batch plus everything PPO needs that is fixed during the update. Shapes (B, T)."""

    batch: TensorBatch
    old_logprobs: torch.Tensor
    """pi_old of the ratio: recomputed by the learner, or the sampler's (``ppo.old_logprobs``)."""
    old_values: torch.Tensor | None
    """V(s_t) before the update; None without a critic."""
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    """Value targets; None without a critic."""
    weights: torch.Tensor | None = None
    """Per-token weights of the policy loss from ``algo.rollout_correction`` (and, with it, the
    staleness correction); None: the loss applies the decoupled weight itself, or none."""

    def select(self, rows: torch.Tensor) -> PreparedBatch:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return PreparedBatch(self.batch.select(rows), pick(self.old_logprobs), pick(self.old_values),
                             pick(self.ref_logprobs), pick(self.advantages), pick(self.returns), pick(self.weights))

    def trimmed(self) -> PreparedBatch:
        """The same rows with the batch's padding columns cut (:meth:`TensorBatch.trimmed`) and
        every (B, T) tensor cut to the same response width."""
        batch = self.batch.trimmed()
        width = batch.response_ids.shape[1]
        cut = lambda t: None if t is None else t[:, :width]  # noqa: E731
        return PreparedBatch(batch, cut(self.old_logprobs), cut(self.old_values), cut(self.ref_logprobs),
                             cut(self.advantages), cut(self.returns), cut(self.weights))


def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TensorBatch:
    """Prompt ids left-padded, response ids right-padded, as a :class:`TensorBatch` (scores 0)."""
    B = len(prompts)
    P = max(max(len(p) for p in prompts), 1)
    T = max(max(len(r) for r in responses), 1)
    pid = torch.full((B, P), pad_id, dtype=torch.long)
    pm = torch.zeros(B, P, dtype=torch.long)
    rid = torch.full((B, T), pad_id, dtype=torch.long)
    rm = torch.zeros(B, T)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if p:
            pid[i, P - len(p):] = torch.tensor(p)
            pm[i, P - len(p):] = 1
        rid[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        rm[i, :len(r)] = 1.0
    zeros = torch.zeros(B)
    return TensorBatch(prompt_ids=pid, prompt_mask=pm, response_ids=rid, response_mask=rm,
                       sampler_logprobs=torch.zeros(B, T), scores=zeros, policy_versions=zeros.long(),
                       prompt_index=torch.arange(B), group_ids=torch.arange(B), truncated=torch.zeros(B, dtype=torch.bool),
                       loss_mask=rm.clone(), token_rewards=torch.zeros(B, T))
