"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.runs import run_tiny


@pytest.fixture(scope="session")
def models_dir(tiny_policy_path) -> Path:
    """``model.cache_dir`` holding the tiny models."""
    return Path(tiny_policy_path).parent


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, models_dir) -> tuple[Path, list[dict]]:
    """:data:`~tests.integration.runs.OVERRIDES` run uninterrupted for 4 steps (checkpoints at 2
    and 4): its directory and metrics rows."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, run_tiny(out, models_dir)
