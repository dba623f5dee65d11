"""Shared fixtures: the offline tiny models, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_policy_path(tmp_path_factory):
    """Directory of the random-init ``tiny`` causal LM (seed 0), Hugging Face format."""
    from ray_rlhf.models.factory import ensure_model

    return ensure_model("policy", "tiny", tmp_path_factory.getbasetemp() / "models", seed=0)


@pytest.fixture(scope="session")
def tiny_reward_path(tmp_path_factory):
    """Directory of the random-init ``tiny`` reward model (scalar head, seed 0)."""
    from ray_rlhf.models.factory import ensure_model

    return ensure_model("reward", "tiny", tmp_path_factory.getbasetemp() / "models", seed=0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device (and vLLM's CUDA build): skip them cleanly here."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
