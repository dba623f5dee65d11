"""Supervised fine-tuning's objective: the token NLL of the response (assistant) tokens.

One micro-batch's loss is ``-sum(m * log p) / N`` with ``N`` the minibatch's response tokens
(:attr:`~ray_rlhf.learning.engine.Micro.num_tokens`), so micro-batches and ranks add up to
:func:`ray_rlhf.algo.preference.sft_loss` of the whole minibatch. Prompt tokens carry no loss:
they sit in ``prompt_ids``, outside the response mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ray_rlhf.algo.masked import masked_sum
from ray_rlhf.learning.batch import TensorBatch
from ray_rlhf.learning.engine import Engine, Forward, Micro
from ray_rlhf.learning.stats import Stats, stat


@dataclass
class SFTRows:
    """SFT's prepared batch: the rows as they are."""

    batch: TensorBatch

    def select(self, rows: torch.Tensor) -> SFTRows:
        return SFTRows(self.batch.select(rows))

    def trimmed(self) -> SFTRows:
        return SFTRows(self.batch.trimmed())


@dataclass(kw_only=True)
class SFTStats(Stats):
    loss: float = stat("sft/loss", math.nan)
    """Mean NLL per response token (token-weighted share of the minibatch's)."""


class SFTObjective:
    """Token NLL over the response tokens, a token mean over the minibatch."""

    uses_critic = False
    needs_reference = False

    def prepare(self, batch: TensorBatch, engine: Engine) -> tuple[SFTRows, Stats]:
        return SFTRows(batch), SFTStats()

    def loss(self, micro: Micro[SFTRows], forward: Forward) -> tuple[torch.Tensor, SFTStats]:
        out = forward(micro.data.batch, with_values=False, with_entropy=False)
        loss = -masked_sum(out.logprobs, micro.mask) / micro.num_tokens
        return loss, SFTStats(loss=float(loss.detach()))

    def finish(self, prepared: SFTRows, stats: Stats, batch: TensorBatch) -> Stats:
        return SFTStats()

    @torch.no_grad()
    def evaluate(self, batch: TensorBatch, engine: Engine) -> float:
        """Mean NLL per response token of ``batch`` (the eval loss)."""
        out = engine.gather(batch, lambda mb: {"lp": engine.forward(mb, with_values=False, with_entropy=False).logprobs},
                            ("lp",))
        return float(-masked_sum(out["lp"], batch.response_mask) / batch.response_mask.sum().clamp(min=1))
