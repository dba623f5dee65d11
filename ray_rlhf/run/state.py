"""A run's checkpoint: the learner's part (written by the learner) plus the driver's state.

Storage layout and atomicity are :mod:`ray_rlhf.checkpoint`'s; this module decides what goes in:
the learner group's state, the weight version, the prompt stream's cursor, the pool's restart
count and the resolved config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray_rlhf import checkpoint
from ray_rlhf.config.schema import RunConfig
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.run.actors import RunActors

log = logging.getLogger(__name__)


def save(cfg: RunConfig, actors: RunActors, stream: PromptStream, step: int) -> Path:
    """Write the checkpoint of ``step`` atomically under ``output_dir``; keep the newest ``keep``."""
    state = {"step": step, "version": actors.broadcaster.version, "data": stream.state_dict(),
             "pool_restarts": actors.pool.restarts, "config": cfg.model_dump(mode="json")}
    path = checkpoint.save(cfg.output_dir, step, actors.learners.save, state, keep=cfg.checkpoint.keep)
    log.info("checkpoint written: %s", path)
    return path


def restore(actors: RunActors, stream: PromptStream, path: Path, state: dict) -> int:
    """Load a checkpoint into the learners, bring every generator to its version; returns its step."""
    actors.learners.load(path)
    stream.load_state_dict(state["data"])
    actors.pool.restarts = int(state.get("pool_restarts", 0))
    actors.broadcaster.restore(int(state["version"]), actors.pool.handles)
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])
