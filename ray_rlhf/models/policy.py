"""The policy: a causal LM with a scalar value head on its own trunk.

Sequence layout used everywhere in the learner (``P`` prompt positions, ``T`` response positions)::

    input_ids  = [ <pad> <pad> p1 p2 p3 | r1 r2 r3 <pad> ]      prompt LEFT-padded, response RIGHT-padded
    positions  =   0     0     0  1  2  |  3  4  5   5
    logits[P-1+t]      predict r_{t+1}   (t = 0 .. T-1)
    values[t]   = V(state before r_{t+1}) = value_head(h[P-1+t])

so every per-token tensor the learner uses has shape ``(B, T)`` and lines up with
``response_ids`` and the response mask (1 = real response token). The value function is a separate
head on the LM's final hidden states (InstructGPT, Ouyang et al. 2022, sec. 3.5; Ziegler et al. 2019),
or -- optionally -- on the trunk of a separate critic model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ray_rlhf.algo.losses import entropy_from_logits, logprobs_from_logits


@dataclass
class PolicyOutput:
    """One forward pass over (prompt, response) pairs."""

    logprobs: torch.Tensor
    """Log-probability of each response token. Shape: (B, T)."""
    values: torch.Tensor | None
    """Value estimate before each response token. Shape: (B, T). None when not asked for."""
    entropy: torch.Tensor | None
    """Entropy of the next-token distribution at each response position. Shape: (B, T)."""


def sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """Concatenate left-padded prompts and right-padded responses; positions skip padding.

    Shapes: prompt_* (B, P), response_* (B, T) -> input_ids, attention_mask, position_ids (B, P+T).
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


class PolicyWithValueHead(nn.Module):
    """Causal LM + scalar value head; one forward gives logprobs, values and entropy.

    ``lm`` is any Hugging Face causal LM exposing ``get_decoder()`` (the trunk) and
    ``get_output_embeddings()`` (the LM head). With ``critic`` given, values come from the critic's
    trunk instead of the policy's (separate critic); the value head is ours either way.
    """

    def __init__(self, lm: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.critic = critic
        trunk_cfg = (critic or lm).config
        self.value_head = nn.Linear(trunk_cfg.hidden_size, 1)
        # Small init: values start near 0 and the first updates are driven by the returns.
        nn.init.normal_(self.value_head.weight, std=1.0 / (trunk_cfg.hidden_size + 1) ** 0.5 * 0.1)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float = 1.0,
        with_values: bool = True,
        with_entropy: bool = True,
    ) -> PolicyOutput:
        """Score responses. Shapes: prompt_* (B, P), response_* (B, T); outputs (B, T).

        ``temperature`` divides the logits, so that logprobs match a sampler that drew at that
        temperature (PPO's ratio must compare the distributions actually sampled from).
        """
        inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        P, T = prompt_ids.shape[1], response_ids.shape[1]
        states = response_states(self.lm, inputs, P, T)
        logits = response_logits(self.lm, states, temperature)
        logprobs = logprobs_from_logits(logits, response_ids)
        entropy = entropy_from_logits(logits) if with_entropy else None
        values = None
        if with_values:
            if self.critic is not None:
                states = response_states(self.critic, inputs, P, T)
            values = self.value_head(states).squeeze(-1).float()
        return PolicyOutput(logprobs=logprobs, values=values, entropy=entropy)


def response_states(lm: nn.Module, inputs, P: int, T: int) -> torch.Tensor:
    """Final hidden states before each response token. Shape: (B, T, H)."""
    input_ids, attention_mask, position_ids = inputs
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return hidden[:, P - 1 : P + T - 1]


def response_logits(lm: nn.Module, states: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Next-token logits (float32, divided by the sampling temperature). Shape: (B, T, V)."""
    logits = lm.get_output_embeddings()(states).float()
    return logits / temperature if temperature != 1.0 else logits


@torch.no_grad()
def reference_logprobs(ref_lm: nn.Module, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0):
    """Log-probabilities of the response tokens under the frozen reference LM. Shape: (B, T)."""
    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    states = response_states(ref_lm, inputs, prompt_ids.shape[1], response_ids.shape[1])
    return logprobs_from_logits(response_logits(ref_lm, states, temperature), response_ids)
