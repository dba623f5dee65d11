"""The sampled token's log-prob and the entropy, from logits, in one pass and little memory.

With ``z = logits / tau`` (``tau`` the sampling temperature) and ``lse = log sum_v exp z_v``::

    log p(y)  = z_y - lse
    H         = -sum_v p_v log p_v           (p = softmax z, log p_v = z_v - lse)

and the gradients (from ``d p_i / d z_j = p_i ([i = j] - p_j)``)::

    d log p(y) / d z_j = [j = y] - p_j
    d H        / d z_j = -p_j (log p_j + H)

(``H = lse - sum_v p_v z_v`` is the same number, but loses digits to cancellation when H is small.)

Why not ``log_softmax(z).gather(..)`` and ``-(softmax * log_softmax).sum()``: each of those
materialises several (B, T, V) float32 tensors and autograd keeps most of them for the backward --
for a 150 k vocabulary, 1 k response tokens and 8 rows, ~5 GB each. Here the forward and backward
go over row chunks of at most :data:`CHUNK_ELEMENTS` logits (the softmax is recomputed in the
backward from ``z`` and ``lse``), so what lives between forward and backward is ``z`` itself plus
two (B, T) vectors. Banned tokens (``-inf`` logits) have ``p = 0`` and contribute 0 to ``H`` and
its gradient, without NaN. Reference implementations (autograd, full tensors):
``logprobs_from_logits`` and ``entropy_from_logits`` in ``tests/reference_math.py``; the tests
check values and gradients against them and against ``gradcheck`` in float64.
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK_ELEMENTS", "token_logprobs_and_entropy"]

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MB in float32): bounds the softmax temporaries of forward and backward."""


def _rows(vocab: int) -> int:
    """Rows per chunk."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _finite(z: torch.Tensor) -> torch.Tensor:
    """``z`` with ``-inf`` replaced by the dtype's lowest value (so that ``0 * z`` is 0, not NaN)."""
    return z.clamp(min=torch.finfo(z.dtype).min)


class _TokenLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, tokens: torch.Tensor, with_entropy: bool):
        n, vocab = z.shape
        lse = torch.empty(n, dtype=z.dtype, device=z.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=z.dtype, device=z.device)
        step = _rows(vocab)
        for s in range(0, n, step):
            zc = z[s : s + step]
            if not with_entropy:
                lse[s : s + step] = torch.logsumexp(zc, dim=-1)
                continue
            m = _finite(zc.amax(dim=-1, keepdim=True))
            p = torch.exp(zc - m)  # one exp per logit serves lse and the entropy
            total = p.sum(dim=-1, keepdim=True)
            lse_c = m + total.log()
            lse[s : s + step] = lse_c.squeeze(-1)
            entropy[s : s + step] = -(p.div_(total) * _finite(zc - lse_c)).sum(-1)
        logp = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
        ctx.save_for_backward(z, tokens, lse, entropy)
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)  # an output not used in the loss gets None: no work for it
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None):
        z, tokens, lse, entropy = ctx.saved_tensors
        n, vocab = z.shape
        if not ctx.with_entropy:
            g_entropy = None
        grad = torch.empty_like(z)
        step = _rows(vocab)
        for s in range(0, n, step):
            sl = slice(s, s + step)
            logp_c = _finite(z[sl] - lse[sl, None])
            p = logp_c.exp()
            g = torch.zeros_like(p)
            if g_logp is not None:
                g -= p * g_logp[sl, None]
            if g_entropy is not None:
                g -= p * (logp_c + entropy[sl, None]) * g_entropy[sl, None]
            grad[sl] = g
        if g_logp is not None:
            grad.scatter_add_(-1, tokens[:, None], g_logp[:, None])
        return grad, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log p(tokens), H)`` of ``softmax(logits / temperature)``, both (B, T) (H None if not asked).

    ``entropy_grad=False`` returns the entropy detached (a diagnostic). Differentiable in
    ``logits`` (module docstring). Shapes: logits (B, T, V), tokens (B, T) integer ids.
    """
    *lead, vocab = logits.shape
    z = logits.reshape(-1, vocab)
    if temperature != 1.0:
        z = z / temperature
    logp, entropy = _TokenLogprobEntropy.apply(z, tokens.reshape(-1).long(), with_entropy)
    logp = logp.view(*lead)
    if not with_entropy:
        return logp, None
    entropy = entropy.view(*lead)
    return logp, entropy if entropy_grad else entropy.detach()
