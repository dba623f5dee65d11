"""Packed sequences: the real tokens of a micro-batch's rows in few lines, attention per row.

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
    """The decoder's final hidden states from one packed pass. Shape: (B, L) -> (B, L, H).

    With flash-attention (varlen kernels: cost grows with the real tokens) the rows become one
    line (1, N). With sdpa or eager the block-diagonal mask is dense, so attention over one line
    costs N^2 -- quadratic in the micro-batch, not in the row. There the rows are binned first-fit
    into lines of at most the longest row's real tokens, (K, C) with K*C ~ N: attention costs
    about N*C (never more than the padded batch's B*L^2) and the other layers see ~N tokens. A
    line's tail is a segment of its own (positions restart at 0), which no real token attends to.
    """
    keep = attention_mask.bool()
    impl = str(getattr(getattr(decoder, "config", None), "_attn_implementation", "") or "")
    if "flash" in impl:
        ids, pos = pack(input_ids, attention_mask, position_ids)
        out = decoder(input_ids=ids, attention_mask=None, position_ids=pos, use_cache=False)
        return unpack(out.last_hidden_state, attention_mask)
    lengths = keep.sum(1).tolist()
    rows = [b for b in range(len(lengths)) if lengths[b]]
    cap = max(lengths) if rows else 1
    lines = first_fit(rows, [lengths[b] for b in rows], cap) or [[]]
    line_of = torch.zeros(len(lengths), dtype=torch.long)
    start = torch.zeros(len(lengths), dtype=torch.long)
    used = []
    for k, line in enumerate(lines):
        at = 0
        for b in line:
            line_of[b], start[b] = k, at
            at += lengths[b]
        used.append(at)
    width = max(used) or 1
    within = keep.long().cumsum(1) - 1  # rank of each real token in its row
    dest = (line_of[:, None] * width + start[:, None] + within)[keep]  # flat slot of each real token
    tail = torch.arange(width)[None, :] - torch.tensor(used)[:, None]  # positions past each line's end
    pos = tail.clamp(min=0).reshape(-1).to(position_ids.dtype)
    ids = torch.zeros(len(lines) * width, dtype=input_ids.dtype)
    ids[dest], pos[dest] = input_ids[keep].cpu(), position_ids[keep].cpu()
    dev = input_ids.device
    out = decoder(input_ids=ids.view(len(lines), width).to(dev), attention_mask=None,
                  position_ids=pos.view(len(lines), width).to(dev), use_cache=False).last_hidden_state
    flat = out.reshape(len(lines) * width, *out.shape[2:])
    res = flat.new_zeros(*keep.shape, *flat.shape[1:])
    res[keep] = flat[dest.to(dev)]
    return res


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
