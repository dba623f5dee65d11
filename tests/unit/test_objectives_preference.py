"""SFT and DPO objectives on the engine, with the bigram model of test_engine: micro-batches add up
to the whole minibatch's loss, training lowers the SFT loss and raises DPO's margin, the reference
runs once per pair."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ray_rlhf.algo.preference import dpo_loss, sft_loss
from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.engine import Engine, EngineOptions, Optimization
from ray_rlhf.learning.objectives.dpo import DPOObjective
from ray_rlhf.learning.objectives.sft import SFTObjective
from tests.batches import make_batch
from tests.unit.test_engine import VOCAB, Bigram

LENGTHS = [1, 4, 2, 3, 1, 2]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    rows = [dict(prompt_ids=tok(1 + i % 2), response_ids=tok(n), reward=0.0) for i, n in enumerate(LENGTHS)]
    return collate(make_batch(rows), pad_id=0)


class Ref(nn.Module):
    """A frozen bigram as the engine's reference: forward gives the response log-probs."""

    def __init__(self, model, calls):
        super().__init__()
        self.m, self.calls = copy.deepcopy(model).requires_grad_(False), calls

    def forward(self, *inputs):
        self.calls.append(1)
        return self.m(*inputs).logprobs


def engine(lr=0.0, micro=6, epochs=1, reference=None, model=None):
    torch.manual_seed(0)
    optim = Optimization(epochs=epochs, minibatch_size=6, micro_batch_size=micro, lr=lr, max_grad_norm=1e9)
    return Engine(model or Bigram(), reference, EngineOptions(), optim, seed=0)


@pytest.mark.parametrize("micro", [1, 4, 6])
def test_sft_micro_batches_add_up_to_the_token_mean_nll(micro):
    b, e = batch(), engine(micro=micro)
    full = sft_loss(e.model(*b.inputs()).logprobs, b.response_mask).item()
    obj = SFTObjective()
    stats, _ = e.train(obj.prepare(b, e)[0], obj.loss)
    assert stats.loss == pytest.approx(full, rel=1e-5)
    assert obj.evaluate(b, e) == pytest.approx(full, rel=1e-5)


def test_sft_training_lowers_the_loss():
    b, e = batch(), engine(lr=0.1, micro=2)
    obj = SFTObjective()
    before = obj.evaluate(b, e)
    for _ in range(20):
        e.train(obj.prepare(b, e)[0], obj.loss)
    assert obj.evaluate(b, e) < before - 0.3


def pairs_and_engine(lr=0.0, micro=6, epochs=1):
    model, calls = Bigram(), []
    e = engine(lr=lr, micro=micro, epochs=epochs, model=model, reference=Ref(model, calls))
    return batch(0), batch(1), e, calls


def test_dpo_at_the_reference_has_loss_log2_and_zero_margin():
    c, r, e, calls = pairs_and_engine()
    obj = DPOObjective(beta=0.1)
    pairs = obj.reference(c, r, e)
    assert len(calls) == 2  # one pass over the chosen, one over the rejected
    stats, _ = e.train(pairs, obj.loss)
    # at pi = pi_ref every h = 0: -log sigmoid(0) = log 2
    assert stats.loss == pytest.approx(math.log(2), rel=1e-5)
    assert stats.margin == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("micro", [1, 4])
def test_dpo_micro_batches_add_up_to_the_pair_mean(micro):
    c, r, e, _ = pairs_and_engine(micro=micro)
    with torch.no_grad():  # move the policy off the reference so the loss is not log 2 everywhere
        e.model.lm.weight.add_(torch.randn_like(e.model.lm.weight, generator=torch.Generator().manual_seed(3)))
    obj = DPOObjective(beta=0.5, label_smoothing=0.1)
    pairs = obj.reference(c, r, e)
    lp = lambda b: (e.model(*b.inputs()).logprobs * b.response_mask).sum(1)  # noqa: E731
    full, s = dpo_loss(lp(c), lp(r), pairs.ref_chosen, pairs.ref_rejected, 0.5, label_smoothing=0.1)
    stats, _ = e.train(pairs, obj.loss)
    assert stats.loss == pytest.approx(full.item(), rel=1e-5)
    assert stats.margin == pytest.approx(s.margin, rel=1e-5, abs=1e-6)


def test_dpo_training_raises_the_margin_and_reuses_the_reference():
    c, r, e, calls = pairs_and_engine(lr=0.1, micro=2, epochs=3)
    obj = DPOObjective(beta=0.5)
    pairs = obj.reference(c, r, e)
    for _ in range(5):
        stats, _ = e.train(pairs, obj.loss)
    assert len(calls) == 2  # the reference ran once, before training
    after = obj.evaluate(pairs, e)
    assert after.margin > 1.0 and after.accuracy > 0.8


def test_dpo_refuses_beta_not_positive():
    with pytest.raises(ValueError, match="dpo.beta"):
        DPOObjective(beta=0.0)
