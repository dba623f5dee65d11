"""Checksums of Hugging Face-named state dicts, shared by the learner and the generators.

The learner calls :func:`state_dict_checksum` on the state dict it sends; a generator calls the
same function on the weights it reads back from its vLLM engine (see
:mod:`ray_rlhf.sync.vllm_readback`) and on the tensors it received. Equal strings mean equal
names, dtypes, shapes and element values.

Pure torch + hashlib: no Ray, no vLLM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Names that older HF checkpoints carry but no engine loads (vLLM skips them too): excluded from
both sides of the comparison."""


def named_tensors(weights) -> list[tuple[str, torch.Tensor]]:
    """``weights`` as a list of (name, tensor): accepts a mapping or an iterable of pairs."""
    if isinstance(weights, Mapping):
        return list(weights.items())
    return [(str(name), tensor) for name, tensor in weights]


def canonical(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy-or-view of ``t`` whose bytes depend only on its values.

    Two float encodings of "the same number" are merged so that a weight read back through a
    matmul kernel hashes like the original: ``-0.0`` becomes ``+0.0`` (``x + 0.0`` does that under
    round-to-nearest) and subnormals become zero (CPU GEMM kernels may run with flush-to-zero).
    Integer and bool tensors are returned unchanged.
    """
    t = t.detach().to("cpu")
    if t.is_floating_point():
        tiny = torch.finfo(t.dtype).tiny
        t = torch.where(t.abs() < tiny, torch.zeros((), dtype=t.dtype), t) + 0.0
    return t.contiguous()


def _hash_into(h, name: str, t: torch.Tensor) -> None:
    t = canonical(t)
    h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def state_dict_checksum(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex, first 32 chars) over every tensor's name, dtype, shape and canonical bytes.

    Names are sorted, so the result does not depend on dict order; names ending in
    :data:`IGNORED_SUFFIXES` are skipped. Any changed element, a missing or extra tensor, or a
    dtype/shape change gives a different checksum. Cost: one pass over the weights (~1-2 GB/s).
    """
    items = {n: t for n, t in named_tensors(state) if not n.endswith(IGNORED_SUFFIXES)}
    h = hashlib.sha256()
    for name in sorted(items):
        _hash_into(h, name, items[name])
    return h.hexdigest()[:32]


def tensor_bytes(weights) -> int:
    """Total payload size in bytes."""
    return sum(t.numel() * t.element_size() for _, t in named_tensors(weights))
