"""Pack a state dict into one contiguous buffer per dtype, and back.

The collective backend broadcasts each buffer in one call; the :class:`FlatLayout` (names, shapes,
dtypes, offsets) travels once per process group. The object-store backend ships a
:class:`FlatPayload`: the same buffers as NumPy bytes, which Ray serialises out of band (one copy
into the object store) and a generator on the same node maps read-only without a copy -- a dict
of torch tensors is pickled tensor by tensor instead (measured on the 26 M ``small`` policy, 98 MiB,
AMD EPYC 2 cores: the learner's export 0.13 s as tensors). Pure torch + NumPy.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ray_rlhf.sync.checksum import named_tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class FlatEntry:
    """Where one tensor lives inside its dtype's buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``"float32"``."""
    offset: int
    """Start, in elements, inside the buffer of that dtype."""
    numel: int


@dataclass(frozen=True)
class FlatLayout:
    """The layout of every buffer: entries in send order, and the element count per dtype."""

    entries: tuple[FlatEntry, ...]
    sizes: dict[str, int]
    """dtype name -> buffer length in elements. Buffers are sent in sorted dtype order."""

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty((), dtype=getattr(torch, d)).element_size() for d, n in self.sizes.items())

    def to_json(self) -> str:
        return json.dumps(
            {"entries": [[e.name, list(e.shape), e.dtype, e.offset, e.numel] for e in self.entries], "sizes": self.sizes}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> FlatLayout:
        d = json.loads(text)
        entries = tuple(FlatEntry(n, tuple(s), dt, off, num) for n, s, dt, off, num in d["entries"])
        return cls(entries=entries, sizes={k: int(v) for k, v in d["sizes"].items()})

    def empty_buffers(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Uninitialised receive buffers, one per dtype."""
        return {d: torch.empty(n, dtype=getattr(torch, d), device=device) for d, n in sorted(self.sizes.items())}


def layout_of(weights) -> FlatLayout:
    """The layout that :func:`flatten` produces for ``weights`` (mapping or (name, tensor) pairs)."""
    sizes: dict[str, int] = {}
    entries = []
    for name, t in named_tensors(weights):
        d = _dtype_name(t.dtype)
        off = sizes.get(d, 0)
        entries.append(FlatEntry(name, tuple(t.shape), d, off, t.numel()))
        sizes[d] = off + t.numel()
    return FlatLayout(entries=tuple(entries), sizes=sizes)


def flatten(weights, layout: FlatLayout | None = None, device=None) -> tuple[FlatLayout, dict[str, torch.Tensor]]:
    """One contiguous 1-D buffer per dtype holding every tensor, in ``layout`` order.

    With ``layout`` given, ``weights`` must match it exactly (same names, shapes, dtypes), else
    ``ValueError`` -- a sender must rebuild its group when the model's structure changes.
    """
    pairs = dict(named_tensors(weights))
    if layout is None:
        layout = layout_of(list(pairs.items()))
    elif set(pairs) != {e.name for e in layout.entries}:
        missing = {e.name for e in layout.entries} - set(pairs)
        extra = set(pairs) - {e.name for e in layout.entries}
        raise ValueError(f"weights do not match the group layout: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    first = next(iter(pairs.values()), None)
    device = device if device is not None else (first.device if first is not None else "cpu")
    bufs = layout.empty_buffers(device)
    for e in layout.entries:
        t = pairs[e.name]
        if tuple(t.shape) != e.shape or _dtype_name(t.dtype) != e.dtype:
            raise ValueError(f"{e.name}: got {tuple(t.shape)} {t.dtype}, layout says {e.shape} {e.dtype}")
        bufs[e.dtype][e.offset : e.offset + e.numel].copy_(t.detach().reshape(-1))
    return layout, bufs


def unflatten(layout: FlatLayout, buffers: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs as views into ``buffers`` (no copy), in layout order."""
    return [
        (e.name, buffers[e.dtype][e.offset : e.offset + e.numel].view(e.shape)) for e in layout.entries
    ]


@dataclass(frozen=True)
class FlatPayload:
    """A state dict as one byte buffer per dtype plus its layout: what the learner's export puts in
    Ray's object store (:meth:`~ray_rlhf.sync.sender.WeightSender.export`)."""

    layout: FlatLayout
    buffers: dict[str, np.ndarray]
    """dtype name -> the buffer's bytes (uint8, 1-D); read-only when mapped from the object store."""

    @classmethod
    def of(cls, weights) -> FlatPayload:
        """A copy of ``weights`` (mapping or (name, tensor) pairs, any device) in CPU memory."""
        layout, bufs = flatten(weights, device="cpu")
        return cls(layout, {d: b.view(torch.uint8).numpy() for d, b in bufs.items()})

    def pairs(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, views into the buffers (no copy; read them, do not write them)."""
        with warnings.catch_warnings():  # torch warns that the mapped buffers are read-only: they are only read
            warnings.simplefilter("ignore", UserWarning)
            bufs = {d: torch.from_numpy(a).view(getattr(torch, d)) for d, a in self.buffers.items()}
        return unflatten(self.layout, bufs)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.buffers.values())
