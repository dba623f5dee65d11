"""Reward-model training's objective: the Bradley-Terry loss on (chosen, rejected) pairs.

The model is a Hugging Face ``*ForSequenceClassification`` with ``num_labels=1`` (the kind that
``reward.model_path`` loads, :mod:`ray_rlhf.rewards.model`), wrapped by :class:`PairScorer` so the
engine can call it on a :class:`~ray_rlhf.learning.batch.TensorBatch`: the reward of a sequence is
the score head on the final hidden state of its last real token. The prepared batch holds the
chosen and rejected rows side by side (row ``i`` of each is one pair) and an optional margin per
pair. One micro-batch's loss is ``sum_pairs l_i / num_sequences``, ``l_i`` of
:func:`ray_rlhf.algo.preference.bradley_terry_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from torch import nn

from ray_rlhf.algo.preference import bradley_terry_loss
from ray_rlhf.learning.batch import TensorBatch
from ray_rlhf.learning.engine import Engine, Forward, Micro
from ray_rlhf.learning.stats import Stats, stat
from ray_rlhf.models.policy import sequence_inputs


class PairScorer(nn.Module):
    """A sequence classifier (``lm``, saved as is) giving one scalar reward per (prompt, response)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.critic = None

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, **_) -> SimpleNamespace:
        """Shapes: prompt_* (B, P) left-padded, response_* (B, T) right-padded; ``rewards`` (B,)."""
        input_ids, attention_mask, position_ids = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids).last_hidden_state
        last = prompt_ids.shape[1] + response_mask.sum(1).long() - 1  # the last real token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return SimpleNamespace(rewards=self.lm.score(h).squeeze(-1).float())


@dataclass
class RMPairs:
    """Chosen rows (``batch``), rejected rows, and each pair's margin (0 without a ``margin`` column)."""

    batch: TensorBatch
    rejected: TensorBatch
    margin: torch.Tensor
    """Shape: (B,)."""

    def select(self, rows: torch.Tensor) -> RMPairs:
        return RMPairs(self.batch.select(rows), self.rejected.select(rows), self.margin[rows])

    def trimmed(self) -> RMPairs:
        return replace(self, batch=self.batch.trimmed(), rejected=self.rejected.trimmed())


@dataclass(kw_only=True)
class RMStats(Stats):
    loss: float = stat("rm/loss", math.nan)
    accuracy: float = stat("rm/accuracy", math.nan)
    """Fraction of pairs ranked right (r_c > r_r)."""
    margin: float = stat("rm/margin", math.nan)
    """Mean r_c - r_r."""


class RMObjective:
    """Bradley-Terry pairwise loss on a sequence-classification head."""

    uses_critic = False
    needs_reference = False

    def prepare(self, pairs: RMPairs, engine: Engine) -> tuple[RMPairs, Stats]:
        return pairs, RMStats()

    def _terms(self, forward, pairs: RMPairs):
        rc, rr = forward(pairs.batch).rewards, forward(pairs.rejected).rewards
        return bradley_terry_loss(rc, rr, pairs.margin)

    def loss(self, micro: Micro[RMPairs], forward: Forward) -> tuple[torch.Tensor, RMStats]:
        loss, s = self._terms(forward, micro.data)
        share = (0.0 if micro.empty else len(micro.data.batch)) / micro.num_sequences
        return loss * share, RMStats(loss=float(loss.detach()) * share, accuracy=s.accuracy * share,
                                     margin=s.margin * share)

    def finish(self, prepared: RMPairs, stats: Stats, batch: TensorBatch) -> Stats:
        return RMStats()

    @torch.no_grad()
    def evaluate(self, pairs: RMPairs, engine: Engine) -> RMStats:
        """Loss, accuracy and mean margin over held-out pairs."""
        loss, s = self._terms(engine.forward, pairs)
        return RMStats(loss=float(loss), accuracy=s.accuracy, margin=s.margin)
