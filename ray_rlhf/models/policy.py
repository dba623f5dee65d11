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

from ray_rlhf.algo.token_logprobs import token_logprobs_and_entropy
from ray_rlhf.models.output_head import output_logits, trunk_hidden


@dataclass
class PolicyOutput:
    """One forward pass over (prompt, response) pairs."""

    logprobs: torch.Tensor | None
    """Log-probability of each response token. Shape: (B, T). None when not asked for."""
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

    ``lm`` is any Hugging Face causal LM: the trunk is ``get_decoder()`` and the logits go
    through the model's own output processing (:func:`~ray_rlhf.models.output_head.output_logits`:
    LM head, tied or not, then soft-capping or logit scaling where the model has them). With
    ``critic`` given, values come from the critic's trunk instead of the policy's (separate
    critic); the value head is ours either way; ``value_head=False`` builds none (critic-free).
    """

    def __init__(self, lm: nn.Module, critic: nn.Module | None = None, value_head: bool = True):
        super().__init__()
        self.lm = lm
        self.critic = critic
        self.packed = False
        """One packed pass per forward (:mod:`ray_rlhf.models.packing`): set by the learner from
        ``ppo.packing``; the outputs keep their padded (B, T) layout either way."""
        self.value_head = None
        """None for a critic-free estimator: no value is built, computed or saved."""
        if value_head:
            cfg = (critic or lm).config
            hidden = (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).hidden_size
            self.value_head = nn.Linear(hidden, 1)
            # Small init: values start near 0 and the first updates are driven by the returns.
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5 * 0.1)
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
        with_logprobs: bool = True,
        entropy_grad: bool = True,
    ) -> PolicyOutput:
        """Score responses. Shapes: prompt_* (B, P), response_* (B, T); outputs (B, T).

        ``temperature`` divides the logits, so that logprobs match a sampler that drew at that
        temperature (PPO's ratio must compare the distributions actually sampled from). Only what
        is asked for is computed: with a separate critic and ``with_logprobs=False,
        with_entropy=False`` the policy is not run at all. ``entropy_grad=False`` computes the
        entropy without a graph (a diagnostic, when its loss weight is 0).
        """
        inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        P, T = prompt_ids.shape[1], response_ids.shape[1]
        wants_values = with_values and self.value_head is not None
        states = logprobs = entropy = values = None
        if with_logprobs or with_entropy or (wants_values and self.critic is None):
            states = response_states(self.lm, inputs, P, T, self.packed)
        if with_logprobs or with_entropy:
            # one pass over the logits for both, in row chunks (no full-vocabulary log_softmax copies)
            # float32 log-probs even when the trunk runs in bf16 (autocast): a no-op copy-free .float() otherwise
            logprobs, entropy = token_logprobs_and_entropy(output_logits(self.lm, states).float(), response_ids, temperature,
                                                           with_entropy=with_entropy, entropy_grad=entropy_grad)
            logprobs = logprobs if with_logprobs else None
        if wants_values:
            if self.critic is not None:
                states = response_states(self.critic, inputs, P, T, self.packed)
            values = self.value_head(states).squeeze(-1).float()
        return PolicyOutput(logprobs=logprobs, values=values, entropy=entropy)


def response_states(lm: nn.Module, inputs, P: int, T: int, packed: bool = False) -> torch.Tensor:
    """Final hidden states before each response token (``packed``: from one packed pass).
    Shape: (B, T, H)."""
    input_ids, attention_mask, position_ids = inputs
    return trunk_hidden(lm, input_ids, attention_mask, position_ids, packed)[:, P - 1 : P + T - 1]


class ReferenceModel(nn.Module):
    """The frozen reference LM as a module whose ``forward`` gives the response tokens' log-probs:
    one root module for FSDP2 to shard (``learner.shard_reference``), whose forward hook gathers
    the parameters before the pass -- calling the LM's trunk directly would skip it."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)
        self.packed = False
        """One packed pass per forward, as :attr:`PolicyWithValueHead.packed`."""

    @torch.no_grad()
    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float = 1.0) -> torch.Tensor:
        """Shape: (B, T)."""
        return reference_logprobs(self.lm, prompt_ids, prompt_mask, response_ids, response_mask, temperature, self.packed)


@torch.no_grad()
def reference_logprobs(ref_lm: nn.Module, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0,
                       packed: bool = False):
    """Log-probabilities of the response tokens under the frozen reference LM. Shape: (B, T)."""
    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    states = response_states(ref_lm, inputs, prompt_ids.shape[1], response_ids.shape[1], packed)
    logits = output_logits(ref_lm, states).float()
    return token_logprobs_and_entropy(logits, response_ids, temperature, with_entropy=False)[0]
