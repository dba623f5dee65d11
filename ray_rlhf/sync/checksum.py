"""Checksums of Hugging Face-named state dicts, shared by the learner and the generators.

The learner calls :func:`state_dict_checksum` on the state dict it sends; a generator calls the
same function on the weights it reads back from its engine
(:meth:`~ray_rlhf.sync.receiver.Engine.read_back`) and on the tensors it received. Equal strings mean equal
names, dtypes, shapes and element values.

Pure torch + NumPy + xxhash: no Ray, no vLLM. The hash is XXH3-128 (~15 GB/s here, against
1.5 GB/s for SHA-256): this is a check against corruption and failed loads, not against an
adversary, and the verify step hashes every weight on every generator each sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
import xxhash

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Names that older HF checkpoints carry but no engine loads (vLLM skips them too): excluded from
both sides of the comparison."""


SAMPLE_SUFFIX = "@sample"
"""Key suffix of a sampled slice in an engine read-back (one input feature of a probed layer:
``t[:, j:j+1]``, or ``t[j:j+1, :]`` for a Conv1D ``(in, out)`` weight); compared with
:func:`sample_digests` of the received tensor."""


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


_EXPONENT = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000),
             torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80)}
"""Float dtype -> (integer view, exponent bits). Exponent 0 <=> +-0.0 or a subnormal."""


def canonical_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of :func:`canonical` (``t``), computed with one integer test on the exponent bits
    and no float arithmetic: a view, copied only when some element must change. Shape: (nbytes,)."""
    t = t.detach().to("cpu").contiguous()
    spec = _EXPONENT.get(t.dtype)
    if spec is None:
        return canonical(t).reshape(-1).view(torch.uint8).numpy()
    bits = t.view(spec[0]).numpy().reshape(-1)
    zero = (bits & spec[1]) == 0
    if zero.any():
        bits = np.where(zero, 0, bits).astype(bits.dtype)
    return bits.view(np.uint8)


def _kind(t: torch.Tensor) -> str:
    """The header hashed before a tensor's bytes: its dtype and shape (one spelling for every hash here)."""
    return f"{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n"


def state_dict_checksum(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        names: Iterable[str] | None = None) -> str:
    """XXH3-128 (hex, 32 chars) over every tensor's name, dtype, shape and canonical bytes.

    Names are sorted, so the result does not depend on dict order; names ending in
    :data:`IGNORED_SUFFIXES` are skipped; ``names``, if given, restricts the sum to those tensors
    (a name given but absent counts as missing). Any changed element, a missing or extra tensor, or
    a dtype/shape change gives a different checksum. Cost: one pass over the weights.
    """
    items = {n: t for n, t in named_tensors(state) if not n.endswith(IGNORED_SUFFIXES)}
    wanted = sorted(items) if names is None else sorted(set(names))
    h = xxhash.xxh3_128()
    for name in wanted:
        if name not in items:
            h.update(f"{name}|missing\n".encode())
            continue
        t = items[name]
        h.update(f"{name}|{_kind(t)}".encode())
        if t.numel():
            h.update(canonical_bytes(t))
    return h.hexdigest()


def tensor_digests(state) -> dict[str, str]:
    """Name -> XXH3-64 of one tensor's dtype, shape and canonical bytes (names in
    :data:`IGNORED_SUFFIXES` skipped): compares tensors one by one, e.g. a read-back subset
    against what was received."""
    out = {}
    for name, t in named_tensors(state):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        h = xxhash.xxh3_64(_kind(t).encode())
        if t.numel():
            h.update(canonical_bytes(t))
        out[name] = h.hexdigest()
    return out


def sample_digests(state, sample: int) -> dict[str, tuple[str, str]]:
    """Name -> (digest of ``t[:, j:j+1]``, digest of ``t[i:i+1, :]``) for every 2-D tensor, with
    ``j = sample % columns`` and ``i = sample % rows`` (:func:`tensor_digests` of the slices): what
    a read-back's :data:`SAMPLE_SUFFIX` slice of that tensor must equal, one of the two."""
    out = {}
    for name, t in named_tensors(state):
        if t.dim() == 2 and t.numel() and not name.endswith(IGNORED_SUFFIXES):
            j, i = sample % t.shape[1], sample % t.shape[0]
            col, row = tensor_digests([("c", t[:, j : j + 1]), ("r", t[i : i + 1, :])]).values()
            out[name] = (col, row)
    return out


def received_fingerprints(state, sample: int | None = None) -> tuple[str, dict[str, str], dict[str, tuple[str, str]]]:
    """(:func:`state_dict_checksum`, :func:`tensor_digests`, :func:`sample_digests` with ``sample``
    -- empty without) of ``state``, equal to the three calls but with one canonical pass over the
    bytes: what a generator records of every load."""
    items = {n: t for n, t in named_tensors(state) if not n.endswith(IGNORED_SUFFIXES)}
    full, digests = xxhash.xxh3_128(), {}
    for name in sorted(items):
        t = items[name]
        kind = _kind(t)
        full.update(f"{name}|{kind}".encode())
        h = xxhash.xxh3_64(kind.encode())
        if t.numel():
            b = canonical_bytes(t)
            full.update(b)
            h.update(b)
        digests[name] = h.hexdigest()
    samples = sample_digests(list(items.items()), sample) if sample is not None else {}
    return full.hexdigest(), digests, samples


def tensor_bytes(weights) -> int:
    """Total payload size in bytes."""
    return sum(t.numel() * t.element_size() for _, t in named_tensors(weights))
