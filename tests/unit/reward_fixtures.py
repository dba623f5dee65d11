"""Reward functions for tests/unit/test_rewards.py, referred to as ``tests.unit.reward_fixtures:<name>``."""

from __future__ import annotations

import torch


def one(prompt: str, response: str) -> float:
    """Always 1.0."""
    return 1.0


def response_chars(prompt: str, response: str) -> int:
    """Length of the response in characters (an int, which must be accepted)."""
    return len(response)


def tensor_half(prompt: str, response: str) -> torch.Tensor:
    """0.5 as a 0-dim tensor (must be accepted and converted to a float)."""
    return torch.tensor(0.5)


def raises_on_boom(prompt: str, response: str) -> float:
    """Raises ZeroDivisionError when the response contains 'boom'."""
    if "boom" in response:
        return 1 / 0
    return 0.0


def nan_on_boom(prompt: str, response: str) -> float:
    return float("nan") if "boom" in response else 0.0


def inf_on_boom(prompt: str, response: str) -> float:
    return float("inf") if "boom" in response else 0.0


def string_on_boom(prompt: str, response: str):
    return "0.5" if "boom" in response else 0.0


def none_on_boom(prompt: str, response: str):
    return None if "boom" in response else 0.0


def one_argument(response: str) -> float:
    """Wrong signature: takes only the response."""
    return 0.0


NOT_CALLABLE = 3.0
