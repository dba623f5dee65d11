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
    """Dataset index of each sequence's prompt: the samples of one prompt form a group. Shape: (B,)."""

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, idx: torch.Tensor) -> TensorBatch:
        return TensorBatch(**{k: v[idx] for k, v in self.__dict__.items()})

    def to(self, device: str | torch.device) -> TensorBatch:
        return TensorBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def collate(batch: RolloutBatch, pad_id: int) -> TensorBatch:
    """Pad a scored batch into a :class:`TensorBatch` (prompts left-padded, responses right-padded)."""
    if not len(batch):
        raise ValueError("empty rollout batch")
    if not batch.scored:
        raise ValueError("every rollout must be scored before the learner sees it")
    prompt_ids, prompt_mask = pad_ragged(batch.prompt_ids.astype(np.int64), batch.prompt_offsets, pad_id, left=True)
    response_ids, response_mask = pad_ragged(batch.response_ids.astype(np.int64), batch.response_offsets, pad_id)
    logprobs, _ = pad_ragged(batch.sampler_logprobs.astype(np.float32), batch.response_offsets, 0.0)
    return TensorBatch(
        prompt_ids=torch.from_numpy(prompt_ids),
        prompt_mask=torch.from_numpy(prompt_mask.astype(np.int64)),
        response_ids=torch.from_numpy(response_ids),
        response_mask=torch.from_numpy(response_mask.astype(np.float32)),
        sampler_logprobs=torch.from_numpy(logprobs),
        scores=torch.from_numpy(batch.reward.astype(np.float32)),
        policy_versions=torch.from_numpy(batch.policy_version.astype(np.int64)),
        prompt_index=torch.from_numpy(batch.prompt_index.astype(np.int64)),
    )


@dataclass
class PreparedBatch:
    """A batch plus everything PPO needs that is fixed during the update. Shapes (B, T)."""

    batch: TensorBatch
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
