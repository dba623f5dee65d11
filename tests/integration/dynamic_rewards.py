"""A reward for the dynamic-sampling run (tests/integration/test_dynamic_sampling.py), referred to
as ``tests.integration.dynamic_rewards:letters_on_even_prompts`` (the actors import it from the
directory the run started in)."""

from __future__ import annotations

import zlib

from ray_rlhf.rewards.rules import letter_frequency


def scored_prompt(prompt: str) -> bool:
    """Whether a prompt's responses are scored at all: about half of the prompts, fixed by the text."""
    return zlib.crc32(prompt.encode()) % 2 == 0


def letters_on_even_prompts(prompt: str, response: str) -> float:
    """``letter_frequency`` on the prompts :func:`scored_prompt` picks, 0.0 on the others: their
    groups have zero reward variance whatever the policy samples, and dynamic sampling drops them."""
    return letter_frequency(prompt, response) if scored_prompt(prompt) else 0.0
