"""Estimators over the model's own tokens of a multi-turn response: observation tokens are holes.

A multi-turn row's response is everything after the prompt: model turn 1, the tokens the
environment appended (an observation, chat-template tokens), model turn 2, ... The loss mask
``l_t`` (1 = the model sampled token t) marks the model's tokens; with the response mask ``m_t``
the model tokens are ``k_t = m_t * l_t``. The other response tokens are *holes*: the policy did
not choose them, so they carry no reward, no KL, no value target and no advantage. The MDP's
steps are the model tokens only: for model token t the next state is the NEXT MODEL TOKEN's,
and ``gamma`` / ``lambda`` act once per model step, never per hole. With ``n(t)`` the next model
token after t (none after the last)::

    delta_t = r_t + gamma * V_{n(t)} - V_t
    A_t     = delta_t + gamma * lam * A_{n(t)}        (GAE, Schulman et al. 2016, eq. 16)
    G_t     = r_t + gamma * G_{n(t)}                  (discounted return-to-go)

with ``V_{n(t)} = A_{n(t)} = G_{n(t)} = 0`` after the last model token; at holes and padding
every output is 0.

How: :class:`Holes` *packs* each row's model tokens to the left, in order (a stable gather), so
they form a right-padded row with no holes; the single-turn estimators of
:mod:`ray_rlhf.algo.advantages` run on it unchanged; the results are *unpacked* back to their
columns (a scatter) and 0 elsewhere. A row without holes packs to itself (the gather index is
the identity), so single-turn results are bit-identical to the plain estimators'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ray_rlhf.algo.advantages import discounted_returns, gae, reinforce_pp_advantages

__all__ = [
    "Holes",
    "model_tokens",
    "gae_over_holes",
    "discounted_returns_over_holes",
    "reinforce_pp_over_holes",
    "longest_run",
]


def model_tokens(mask: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """``k = m * l``, the response tokens the model sampled, in ``mask``'s dtype (``mask`` itself
    when ``loss_mask`` is None: a single-turn batch).

    Shape:
        mask: (B, T), 1 = valid response token
        loss_mask: (B, T), 1 = model-sampled token, or None
        returns: (B, T)
    """
    if loss_mask is None:
        return mask
    if loss_mask.shape != mask.shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} does not match mask shape {tuple(mask.shape)}")
    return (mask.bool() & loss_mask.bool()).to(mask.dtype)


@dataclass(frozen=True)
class Holes:
    """Where each row's model tokens go when packed to the left, and back."""

    index: torch.Tensor
    """``index[b, j]``: the column of row b's j-th packed entry (model tokens first, in order,
    then the holes and padding). A permutation of ``0..T-1`` per row. Shape (B, T), long."""
    keep: torch.Tensor
    """The model tokens, unpacked. Shape (B, T), bool."""
    packed_mask: torch.Tensor
    """The packed rows' mask: ``1...1 0...0``, right-padded. Shape (B, T), ``mask``'s dtype."""

    @classmethod
    def of(cls, mask: torch.Tensor, loss_mask: torch.Tensor | None = None) -> Holes:
        """The packing of the model tokens ``mask * loss_mask`` (:func:`model_tokens`).

        Shape: mask (B, T), loss_mask (B, T) or None.
        """
        if mask.dim() != 2:
            raise ValueError(f"mask must be (B, T); got shape {tuple(mask.shape)}")
        keep = model_tokens(mask, loss_mask).bool()
        # stable sort on "is a hole": model tokens first in their order (the identity when none is a hole)
        index = torch.sort((~keep).to(torch.int32), dim=1, stable=True).indices
        return cls(index, keep, keep.gather(1, index).to(mask.dtype))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's entries at its model tokens moved to the left, in order. Shape (B, T) -> (B, T)."""
        return x.gather(1, self.index)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """Packed entries back to their columns; 0 at holes and padding. Shape (B, T) -> (B, T)."""
        out = torch.zeros_like(y).scatter(1, self.index, y)
        return torch.where(self.keep, out, torch.zeros((), dtype=y.dtype, device=y.device))


@torch.no_grad()
def gae_over_holes(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor | None,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and lambda-returns over the model tokens (the module's equations): the
    holes are skipped, so ``V_{n(t)}`` is the next model token's value. Rewards and values at
    holes and padding are ignored; both outputs are 0 there. Without holes: exactly
    :func:`~ray_rlhf.algo.advantages.gae`.

    Shape:
        rewards, values: (B, T)
        mask: (B, T), 1 = valid response token, right-padded
        loss_mask: (B, T), 1 = model-sampled token; None = all of them
        returns: (advantages (B, T), returns (B, T))
    """
    h = Holes.of(mask, loss_mask)
    adv, ret = gae(h.pack(rewards), h.pack(values), h.packed_mask, gamma, lam)
    return h.unpack(adv), h.unpack(ret)


@torch.no_grad()
def discounted_returns_over_holes(rewards: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor | None,
                                  gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * G_{n(t)}`` over the model tokens (holes skipped), 0 at holes and padding.

    Shape: rewards (B, T); mask (B, T), right-padded; loss_mask (B, T) or None; returns (B, T).
    """
    h = Holes.of(mask, loss_mask)
    return h.unpack(discounted_returns(h.pack(rewards), h.packed_mask, gamma))


@torch.no_grad()
def reinforce_pp_over_holes(rewards_per_token: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor | None,
                            gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (:func:`~ray_rlhf.algo.advantages.reinforce_pp_advantages`) over the model
    tokens: returns with the holes skipped, normalised by the mean and std of the batch's model
    tokens; 0 at holes and padding.

    Shape: rewards_per_token (B, T); mask (B, T), right-padded; loss_mask (B, T) or None; returns (B, T).
    """
    h = Holes.of(mask, loss_mask)
    return h.unpack(reinforce_pp_advantages(h.pack(rewards_per_token), h.packed_mask, gamma))


def longest_run(mask: torch.Tensor) -> torch.Tensor:
    """The longest run of consecutive 1s of each row: the longest model turn of a loss mask (for a
    single-turn row, its response length).

    With ``c_t = sum_{s <= t} k_s``, the run ending at t is ``c_t - max_{s <= t, k_s = 0} c_s``.

    Shape:
        mask: (B, T), 1 = model token
        returns: (B,), ``mask``'s dtype if floating, else long
    """
    k = mask.bool().long()
    c = k.cumsum(1)
    at_zero = torch.where(k.bool(), torch.zeros_like(c), c)
    run = c - at_zero.cummax(1).values
    out = run.max(1).values if run.shape[1] else torch.zeros(run.shape[0], dtype=torch.long, device=run.device)
    return out.to(mask.dtype) if mask.is_floating_point() else out
