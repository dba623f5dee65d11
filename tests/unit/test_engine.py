"""The learner's engine with an objective that is not PPO (a token NLL, what SFT will be), on a
bigram model small enough to check by hand: the seam an objective plugs into, micro-batching that
does not change the gradient, the stats records reduced over passes and ranks by their fields."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ray_rlhf.learning.batch import TensorBatch, collate
from ray_rlhf.learning.engine import Engine, EngineOptions, Micro, Optimization
from ray_rlhf.learning.stats import Stats, stat
from tests.batches import make_batch

VOCAB = 7


class Bigram(nn.Module):
    """log p(r_t | previous token) from one table of logits (the previous token of r_1 is the
    prompt's last)."""

    def __init__(self):
        super().__init__()
        self.lm = nn.Embedding(VOCAB, VOCAB)
        self.critic = None

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, **kwargs):
        prev = torch.cat([prompt_ids[:, -1:], response_ids[:, :-1]], dim=1)
        logits = self.lm(prev).log_softmax(-1)
        return SimpleNamespace(logprobs=logits.gather(-1, response_ids[..., None]).squeeze(-1))


@dataclass
class Rows:
    """The NLL objective's prepared batch: the rows as they are."""

    batch: TensorBatch

    def select(self, rows):
        return Rows(self.batch.select(rows))

    def trimmed(self):
        return Rows(self.batch.trimmed())


@dataclass(kw_only=True)
class NLLStats(Stats):
    nll: float = stat("sft/nll", math.nan)
    longest: float = stat("sft/longest", math.nan, reduce="max")


class TokenNLL:
    """Negative log-likelihood of the response tokens, a token mean over the minibatch."""

    uses_critic = False
    needs_reference = False

    def prepare(self, batch, engine):
        return Rows(batch), NLLStats()

    def loss(self, micro: Micro[Rows], forward):
        out = forward(micro.data.batch)
        loss = -(out.logprobs * micro.mask).sum() / micro.num_tokens
        return loss, NLLStats(nll=loss.item(), longest=float(micro.mask.sum(1).max()))

    def finish(self, prepared, stats, batch):
        return NLLStats()


LENGTHS = [1, 4, 2, 3, 1, 2]


@pytest.fixture
def rows() -> Rows:
    """6 rows, prompts of 1-2 tokens, responses of LENGTHS tokens (13 in all)."""
    g = torch.Generator().manual_seed(0)
    tok = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    batch = make_batch([dict(prompt_ids=tok(1 + i % 2), response_ids=tok(n), reward=0.0) for i, n in enumerate(LENGTHS)])
    return Rows(collate(batch, pad_id=0))


def engine(micro_batch_size=6, micro_batch_tokens=None, **options) -> Engine:
    torch.manual_seed(0)
    optim = Optimization(epochs=1, minibatch_size=6, micro_batch_size=micro_batch_size,
                         micro_batch_tokens=micro_batch_tokens, lr=0.0, max_grad_norm=1e9)
    return Engine(Bigram(), None, EngineOptions(**options), optim, seed=0)


@pytest.mark.parametrize("micro", [dict(micro_batch_size=1), dict(micro_batch_size=4), dict(micro_batch_tokens=6)])
def test_micro_batches_give_the_whole_minibatchs_loss_and_gradient(rows, micro):
    """One minibatch of all 6 rows: the NLL token mean over 13 tokens, computed here in one pass,
    equals the engine's sum of micro-batch losses whatever the micro-batching, and so does the gradient."""
    whole = engine()
    out = whole.model(*rows.batch.inputs())
    nll = -(out.logprobs * rows.batch.response_mask).sum() / 13
    (grad,) = torch.autograd.grad(nll, whole.model.lm.weight)

    eng = engine(**micro)
    stats, update = eng.train(rows, TokenNLL().loss)
    assert stats.nll == pytest.approx(float(nll.detach()), rel=1e-6)
    assert stats.longest == max(LENGTHS)  # a max over the passes, not a sum
    torch.testing.assert_close(eng.model.lm.weight.grad, grad, rtol=1e-5, atol=1e-7)
    assert update.optimizer_steps == 1 and update.real_tokens == sum(LENGTHS) + 9  # + the prompts' 9 tokens
    assert math.isclose(update.grad_norm, float(grad.norm()), rel_tol=1e-5)


def test_padded_tokens_count_the_rows_times_the_widths_each_pass_computed(rows):
    """Each pass computes its rows x its trimmed width (widest prompt + widest response); the
    engine reports their sum, and the real (prompt + response) tokens: 9 + 13."""
    eng = engine(micro_batch_tokens=6)
    passes = []
    forward = eng.forward
    eng.forward = lambda b, **kw: passes.append(b.prompt_ids.numel() + b.response_ids.numel()) or forward(b, **kw)
    _, update = eng.train(rows, TokenNLL().loss)
    assert update.padded_tokens == sum(passes) and update.real_tokens == 22 <= update.padded_tokens


def test_gather_runs_each_micro_batch_without_gradients_and_returns_the_whole_batch(rows):
    eng = engine(micro_batch_size=2)
    seen = []

    def fn(mb):
        seen.append(len(mb))
        assert not torch.is_grad_enabled()
        return {"logprobs": eng.model(*mb.inputs()).logprobs}

    got = eng.gather(rows.batch, fn, ("logprobs",))["logprobs"]
    with torch.no_grad():
        full = eng.model(*rows.batch.inputs()).logprobs
    m = rows.batch.response_mask.bool()
    assert seen == [2, 2, 2] and got.shape == full.shape
    torch.testing.assert_close(got[m], full[m])


def test_an_empty_pass_adds_nothing(rows):
    """The pass a rank runs only to keep in step with the others (no rows of its own)."""
    eng = engine()
    stats, padded, real = eng.micro_step(rows, None, 6, torch.tensor(13.0), TokenNLL().loss)
    assert stats.nll == 0.0 and (padded, real) == (0.0, 0.0)
    assert eng.model.lm.weight.grad.abs().max() == 0


def test_the_ranks_reduce_each_field_as_it_says():
    """Two ranks with the same record: sums double, maxima stay, extra sums double."""
    class TwoRanks:
        rank, world_size = 0, 2
        all_reduce_sum = staticmethod(lambda t: 2 * t)
        all_reduce_max = staticmethod(lambda t: t)

    eng = engine()
    eng.comm = TwoRanks()
    rec, tokens = eng._reduce(NLLStats(nll=0.25, longest=4.0), 10.0)
    assert (rec.nll, rec.longest, tokens) == (0.5, 4.0, 20.0)
