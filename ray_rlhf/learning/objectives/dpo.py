"""DPO's objective: preference pairs, the frozen reference's log-probs computed once per pair.

The prepared batch holds the chosen and the rejected rows side by side (row ``i`` of each is one
pair), so the engine's minibatches and micro-batches keep pairs together. The reference's summed
log-probs are computed in :meth:`DPOObjective.reference` once per example and kept with the pair
(reused across epochs). One micro-batch's loss is ``sum_pairs l_i / num_sequences`` (pairs of the
whole minibatch), ``l_i`` of :func:`ray_rlhf.algo.preference.dpo_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ray_rlhf.algo.preference import dpo_loss
from ray_rlhf.learning.batch import TensorBatch
from ray_rlhf.learning.engine import Engine, Forward, Micro
from ray_rlhf.learning.stats import Stats, stat


@dataclass
class PairRows:
    """Chosen and rejected rows (``batch`` is the chosen), and the reference's summed log-probs."""

    batch: TensorBatch
    rejected: TensorBatch
    ref_chosen: torch.Tensor
    """Shape: (B,)."""
    ref_rejected: torch.Tensor
    """Shape: (B,)."""

    def select(self, rows: torch.Tensor) -> PairRows:
        return PairRows(self.batch.select(rows), self.rejected.select(rows), self.ref_chosen[rows], self.ref_rejected[rows])

    def trimmed(self) -> PairRows:
        return replace(self, batch=self.batch.trimmed(), rejected=self.rejected.trimmed())


@dataclass(kw_only=True)
class DPOStats(Stats):
    """TRL's names; each a pair-weighted share of the minibatch's mean."""

    loss: float = stat("dpo/loss", math.nan)
    chosen: float = stat("rewards/chosen", math.nan)
    rejected: float = stat("rewards/rejected", math.nan)
    accuracy: float = stat("rewards/accuracies", math.nan)
    margin: float = stat("rewards/margins", math.nan)


def sequence_logprob(forward, batch: TensorBatch) -> torch.Tensor:
    """Sum of the response tokens' log-probs. Shape: (B,)."""
    out = forward(batch, with_values=False, with_entropy=False)
    return (out.logprobs * batch.response_mask).sum(1)


class DPOObjective:
    """DPO (sigmoid, with cDPO label smoothing) or IPO on preference pairs."""

    uses_critic = False
    needs_reference = True

    def __init__(self, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
        if beta <= 0:
            raise ValueError(f"dpo.beta must be > 0, got {beta}")
        self.beta, self.kind, self.label_smoothing = beta, loss, label_smoothing

    @torch.no_grad()
    def reference(self, chosen: TensorBatch, rejected: TensorBatch, engine: Engine) -> PairRows:
        """The pairs with the frozen reference's summed log-probs (call once per dataset)."""
        ref = engine.reference

        def fwd(b, **_):
            return type("Out", (), {"logprobs": ref(*b.inputs())})()

        with engine.autocast():
            rc, rr = sequence_logprob(fwd, chosen), sequence_logprob(fwd, rejected)
        return PairRows(chosen, rejected, rc.float(), rr.float())

    def prepare(self, pairs: PairRows, engine: Engine) -> tuple[PairRows, Stats]:
        return pairs, DPOStats()

    def _terms(self, forward, pairs: PairRows):
        pc, pr = sequence_logprob(forward, pairs.batch), sequence_logprob(forward, pairs.rejected)
        return dpo_loss(pc, pr, pairs.ref_chosen, pairs.ref_rejected, self.beta, self.kind, self.label_smoothing)

    def loss(self, micro: Micro[PairRows], forward: Forward) -> tuple[torch.Tensor, DPOStats]:
        loss, s = self._terms(forward, micro.data)
        share = (0.0 if micro.empty else len(micro.data.batch)) / micro.num_sequences
        return loss * share, DPOStats(loss=float(loss.detach()) * share, chosen=s.chosen * share,
                                      rejected=s.rejected * share, accuracy=s.accuracy * share, margin=s.margin * share)

    def finish(self, prepared: PairRows, stats: Stats, batch: TensorBatch) -> Stats:
        return DPOStats()

    @torch.no_grad()
    def evaluate(self, pairs: PairRows, engine: Engine) -> DPOStats:
        """The implicit-reward metrics over held-out pairs."""
        loss, s = self._terms(engine.forward, pairs)
        return DPOStats(loss=float(loss), chosen=s.chosen, rejected=s.rejected, accuracy=s.accuracy, margin=s.margin)
