"""DAPO's soft overlong punishment: a length-dependent reward term for responses near the budget.

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", sec. 3.4,
eq. 13. A response cut off at the generation budget gets a reward for an unfinished answer,
which is noise to the policy; DAPO instead adds a penalty that ramps linearly from 0 to -1 over
the last ``L_cache`` tokens of the budget ``L_max``, telling the policy to finish before it.
"""

from __future__ import annotations

import torch

__all__ = ["overlong_penalty"]


def overlong_penalty(response_lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment ``R_length(y)``, added to each sequence's reward.

    Yu et al. 2025, "DAPO", eq. 13, with ``L_max = max_new_tokens`` and ``L_cache = buffer``::

        R_length(y) = 0                                  if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                    = -1                                 if |y| > L_max

    The ramp reaches -1 at ``|y| = L_max``: a response the sampler truncated at the budget
    (and one longer than it, which the sampler cannot produce) gets the full -1.

    ``0 < buffer < max_new_tokens`` (ValueError otherwise).

    Shape:
        response_lengths: (B,) response token counts |y| (int or float)
        returns: (B,) float (``response_lengths``' dtype if floating, else the default dtype)
    """
    if not 0 < buffer < max_new_tokens:
        raise ValueError(
            f"overlong buffer must satisfy 0 < buffer < max_new_tokens (the penalty ramps over the last `buffer` "
            f"tokens of the budget); got buffer={buffer}, max_new_tokens={max_new_tokens}"
        )
    dtype = response_lengths.dtype if response_lengths.is_floating_point() else torch.get_default_dtype()
    length = response_lengths.detach().to(dtype)
    start = max_new_tokens - buffer
    ramp = (start - length) / buffer
    zero = torch.zeros((), dtype=dtype, device=length.device)
    minus_one = torch.full((), -1.0, dtype=dtype, device=length.device)
    return torch.where(length <= start, zero, torch.where(length <= max_new_tokens, ramp, minus_one))
