"""A learner rank died: restart the learner group, restore the newest checkpoint, go on.

The driver calls :func:`recover_learners` on a :class:`~ray_rlhf.learning.group.LearnerError`
(at most ``learner.max_restarts`` times in a run). The new group loads the newest complete
checkpoint (or starts from the initial model when there is none), the generators are brought to
its version, and the steps after it are replayed. Because sampling is seeded per (step, prompt,
sample) and the prompt stream's cursor is in the checkpoint, the replayed steps are the steps the
undisturbed run made: the run ends with the same weights and metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray_rlhf import checkpoint
from ray_rlhf.config.schema import RunConfig
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.run import state
from ray_rlhf.run.actors import RunActors
from ray_rlhf.run.rollouts import StepRollouts

log = logging.getLogger(__name__)


def recover_learners(cfg: RunConfig, actors: RunActors, stream: PromptStream, policy_path: Path,
                     error: Exception) -> tuple[int, list[StepRollouts]]:
    """A new learner group at the newest checkpoint; returns its step and the stored batches."""
    log.warning("%s: restarting the learner group from the newest checkpoint", error)
    actors.replace_learners(cfg, policy_path)
    store = checkpoint.open_store(checkpoint.location(cfg))
    found = store.latest()
    if found is None:  # nothing saved yet: from the initial model and the first prompts
        stream.load_state_dict({"epoch": 0, "position": 0})
        actors.broadcaster.restore(0, actors.pool.handles)
        log.warning("no checkpoint yet: the run starts over from step 1")
        return 0, []
    return state.restore(actors, stream, store.uri, found, checkpoint.read_state(store, found, policy_path))
