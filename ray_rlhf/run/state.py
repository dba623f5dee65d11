"""A run's checkpoint: the learner's part (written by the learner) plus the driver's state.

Where and how atomically checkpoints are stored is :mod:`ray_rlhf.checkpoint`'s (a local directory
or, with ``checkpoint.location`` a URI, an object store: ``s3://``, ``gs://``...); what a checkpoint
holds is decided here: the learner group's state (rank 0 writes its part straight into the store,
from its own node), the policy version, the prompt stream's cursor (past every prompt drawn,
dynamic sampling's extra rounds included), the pool's restart count, the resolved config and --
in asynchronous runs -- the scored batches already produced for the next steps
(``pending/step_NNNNNN.parquet``, with their dynamic-sampling counts: their samplers' weights are
not in the checkpoint, so they are kept rather than regenerated).
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ray_rlhf import checkpoint
from ray_rlhf.checkpoint import Checkpoint
from ray_rlhf.checkpoint.layout import DRIVER_STATE, step_dir_name
from ray_rlhf.config.schema import RunConfig
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.generation.pool import PoolEvents
from ray_rlhf.records import RolloutSummary, rollout_batch_from_arrow
from ray_rlhf.run.actors import RunActors
from ray_rlhf.run.rollouts import StepRollouts

log = logging.getLogger(__name__)

PENDING = "pending"


def save(cfg: RunConfig, actors: RunActors, cursor: dict, step: int, pending: list[StepRollouts] = ()) -> str:
    """Write the checkpoint of ``step`` atomically; keep the newest ``checkpoint.keep``.

    ``cursor``: the prompt stream's cursor after the last step whose prompts the checkpoint
    covers (``step``, or the last of ``pending``).
    """
    state = {"step": step, "version": step, "data": cursor, "pool_restarts": actors.pool.restarts,
             "pending": [_pending_entry(p) for p in pending], "config": cfg.model_dump(mode="json")}
    files = {DRIVER_STATE: json.dumps(state, indent=1, sort_keys=True).encode()}
    for p in pending:
        sink = pa.BufferOutputStream()
        pq.write_table(ray.get(p.scored).to_arrow(p.step), sink)
        files[_pending_name(p.step)] = sink.getvalue().to_pybytes()
    store = checkpoint.open_store(checkpoint.location(cfg))
    ckpt = store.save(step, lambda staging: actors.learners.save_part(store.uri, staging), files,
                      keep=cfg.checkpoint.keep)
    log.info("checkpoint written: %s", ckpt.path)
    return ckpt.path


def _pending_name(step: int) -> str:
    """``pending/step_000012.parquet``: the stored scored batch of a step after the checkpoint's."""
    return f"{PENDING}/{step_dir_name(step)}.parquet"


def _pending_entry(p: StepRollouts) -> dict:
    """What a pending step's metrics need besides its batch: its times and dynamic-sampling counts."""
    entry = {"step": p.step, "seconds": p.seconds}
    if p.sampling_rounds is not None:
        entry.update(sampling_rounds=p.sampling_rounds, discarded_groups=p.discarded_groups)
    return entry


def restore(actors: RunActors, stream: PromptStream, uri: str, ckpt: Checkpoint,
            state: dict) -> tuple[int, list[StepRollouts]]:
    """Load a checkpoint into the learners, bring every generator to its version; returns its step
    and the batches it holds for the next steps."""
    store = checkpoint.open_store(uri)
    actors.learners.load_part(store.uri, ckpt)
    stream.load_state_dict(state["data"])
    actors.pool.restarts = int(state.get("pool_restarts", 0))
    actors.broadcaster.restore(int(state["version"]), actors.pool.handles)
    pending = []
    for entry in state.get("pending", []):
        s = int(entry["step"])
        data = store.read_bytes(ckpt, _pending_name(s))
        batch = rollout_batch_from_arrow(pq.read_table(pa.BufferReader(data)))
        seconds = {k: float(v) for k, v in entry.get("seconds", {}).items() if k in ("generate", "reward")}
        rounds = entry.get("sampling_rounds")
        pending.append(StepRollouts(s, ray.put(batch), RolloutSummary.of(batch), PoolEvents(), cursor={},
                                    seconds=seconds,  # made before the stop: its times as measured then
                                    sampling_rounds=None if rounds is None else int(rounds),
                                    discarded_groups=int(entry.get("discarded_groups", 0))))
    log.info("resumed from %s at step %d", ckpt.path, state["step"])
    return int(state["step"]), pending
