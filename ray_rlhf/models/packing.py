"""Packed sequences: the real tokens of a micro-batch's rows as one sequence, attention per row.

A padded micro-batch (B, L) becomes ``input_ids`` (1, N), N = real tokens, with ``position_ids``
restarting at 0 at each row's first token. transformers (>= 4.56; 5.x here) detects the restarts
(``masking_utils.find_packed_sequence_indices``) when no attention mask is given and builds a
block-diagonal causal mask for sdpa/eager, or ``cu_seq_lens`` for flash-attention varlen; the
probe (:mod:`ray_rlhf.models.packing_probe`) checks that a given model really confines
attention. Hidden states are scattered back to the padded (B, L, H) layout (zeros at padding),
so every per-token output keeps the shapes the PPO objective uses.
"""

from __future__ import annotations

import torch


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """Real tokens of each row, concatenated in row order.

    Shapes: (B, L) each -> ``input_ids``, ``position_ids`` (1, N); ``attention_mask`` 1 = real
    token, real tokens contiguous in each row (left-padded prompt, right-padded response).
    """
    keep = attention_mask.bool()
    return input_ids[keep].unsqueeze(0), position_ids[keep].unsqueeze(0)


def unpack(packed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scatter per-token values back to the padded layout, zeros at padding.

    Shapes: ``packed`` (1, N, ...) -> (B, L, ...), ``attention_mask`` (B, L) with N ones.
    """
    keep = attention_mask.bool()
    out = packed.new_zeros(*keep.shape, *packed.shape[2:])
    out[keep] = packed[0]
    return out


def packed_hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states from one packed pass. Shape: (B, L) -> (B, L, H)."""
    ids, pos = pack(input_ids, attention_mask, position_ids)
    out = decoder(input_ids=ids, attention_mask=None, position_ids=pos, use_cache=False)
    return unpack(out.last_hidden_state, attention_mask)


def first_fit(rows: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Bins of ``rows`` whose real tokens sum to at most ``budget``: longest first, each row into
    the first bin it fits (first-fit decreasing); a row longer than the budget gets a bin alone.
    ``lengths[i]`` is row ``rows[i]``'s real tokens."""
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], rows[i]))
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for b, u in enumerate(used):
            if u + lengths[i] <= budget:
                bins[b].append(rows[i])
                used[b] += lengths[i]
                break
        else:
            bins.append([rows[i]])
            used.append(lengths[i])
    return bins
