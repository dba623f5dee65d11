"""The fused log-prob/entropy (ray_rlhf.algo.token_logprobs) against hand-computed numbers, the
autograd references (tests/reference_math.py, themselves checked by hand here), and gradcheck in
float64."""

from __future__ import annotations

import math

import pytest
import torch

from ray_rlhf.algo import token_logprobs
from ray_rlhf.algo.token_logprobs import token_logprobs_and_entropy
from tests.reference_math import entropy_from_logits, logprobs_from_logits


def test_the_references_by_hand():
    # logits [0, ln 3] -> probs [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    tokens = torch.tensor([[1, 0]])
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), torch.tensor([[math.log(0.75), math.log(0.5)]]))
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335; uniform over 2 -> ln 2
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[h, math.log(2.0)]]))


def test_the_reference_entropy_is_stable_for_huge_and_banned_logits():
    logits = torch.tensor([[[1e4, 1e4, -math.inf, -math.inf], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h.detach(), torch.tensor([[math.log(2.0), math.log(4.0)]]))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_hand_computed_two_tokens():
    # row 0: logits log(3), log(1) -> p = (0.75, 0.25); row 1: uniform over 2
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    tokens = torch.tensor([[0, 1]])
    logp, h = token_logprobs_and_entropy(logits, tokens)
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.75), math.log(0.5)]]))
    torch.testing.assert_close(h, torch.tensor([[h0, math.log(2.0)]]))


def test_temperature_divides_the_logits():
    logits = torch.tensor([[[2.0, 0.0]]])
    logp, h = token_logprobs_and_entropy(logits, torch.tensor([[0]]), temperature=2.0)
    p = math.exp(1.0) / (math.exp(1.0) + 1.0)  # softmax of (1, 0)
    torch.testing.assert_close(logp, torch.tensor([[math.log(p)]]))
    torch.testing.assert_close(h, torch.tensor([[-(p * math.log(p) + (1 - p) * math.log(1 - p))]]))


@pytest.mark.parametrize("chunk", [1 << 24, 7])  # one chunk, and chunks of one row (7 // vocab -> 1)
def test_values_and_gradients_equal_the_autograd_reference(monkeypatch, chunk):
    monkeypatch.setattr(token_logprobs, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 3).requires_grad_()
    logits.data[0, 1, 4] = -math.inf  # a banned token: p = 0, no NaN
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    tokens[0, 1] = 2
    w1, w2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    logp, h = token_logprobs_and_entropy(logits, tokens, temperature=0.7)
    ((logp * w1).sum() + (h * w2).sum()).backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref_lp, ref_h = logprobs_from_logits(logits / 0.7, tokens), entropy_from_logits(logits / 0.7)
    ((ref_lp * w1).sum() + (ref_h * w2).sum()).backward()
    torch.testing.assert_close(logp, ref_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, logits.grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours).all()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda z: token_logprobs_and_entropy(z, tokens, temperature=1.3), (logits,))
    assert torch.autograd.gradcheck(lambda z: token_logprobs_and_entropy(z, tokens)[0], (logits,))
    assert torch.autograd.gradcheck(lambda z: token_logprobs_and_entropy(z, tokens)[1], (logits,))


def test_entropy_without_gradient_and_logprobs_only():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    tokens = torch.randint(0, 9, (2, 4))
    logp, h = token_logprobs_and_entropy(logits, tokens, entropy_grad=False)
    assert not h.requires_grad and logp.requires_grad
    logp.sum().backward()
    ref = logits.detach().clone().requires_grad_()
    logprobs_from_logits(ref, tokens).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    only, none = token_logprobs_and_entropy(logits.detach(), tokens, with_entropy=False)
    assert none is None
    torch.testing.assert_close(only, logprobs_from_logits(logits.detach(), tokens))
