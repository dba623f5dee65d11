"""Where the generators and the learner ranks run (``placement``), and the phase order of a
colocated run.

``placement=split`` (default): every generator in its own single-bundle placement group (an elastic
pool, :class:`~ray_rlhf.generation.pool.GeneratorPool`), the learner ranks in theirs
(:class:`~ray_rlhf.learning.group.LearnerGroup`).

``placement=colocated``: ONE placement group of ``learner.num`` bundles (:func:`colocated_group`);
bundle ``i`` = generator ``i`` + learner rank ``i``, each with its own share of the bundle's GPU
(``generators.num_gpus + learner.num_gpus``, e.g. 0.5 + 0.5 of one GPU) and CPUs. In a synchronous
step the two never compute at the same time, so they take turns with the GPU's memory
(:class:`Colocation`)::

    generating: learner offloaded (AdamW state on CPU, gradients freed), engines awake
        rollout (generate + score)
    training:   engines asleep (vLLM sleep level 1: weights to CPU, KV cache dropped), learner reloaded
        learn
    generating: learner offloaded, engines awake
        sync (the new weights into the awake engines), log, checkpoint

Weights reach the colocated engines through the configured ``sync.backend`` like any other (the
object store, or the collective group); a CUDA-IPC path that never leaves the GPU is not written.
On CPU (vLLM's CPU build has no sleep mode) the engines keep their memory but the phase order is
enforced by each engine (:class:`~ray_rlhf.generation.vllm_engine.EngineSleep`: no generation and no
weight load while asleep) and recorded: every transition appends one JSON line to
``<output_dir>/phases.jsonl`` with what each engine did since the last one (``load``, ``generate``,
``sleep``, ``wake_up``), whether engine memory was really released, and the bytes of learner state
moved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.errors import UserError

log = logging.getLogger(__name__)

PHASES_FILE = "phases.jsonl"


def colocated_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """One bundle per pair: the generator's and the learner rank's CPUs and GPU shares together."""
    g, lc = cfg.generators, cfg.learner
    gpu = g.num_gpus + lc.num_gpus
    return [{"CPU": g.num_cpus + lc.num_cpus, **({"GPU": gpu} if gpu else {})} for _ in range(lc.num)]


def colocated_group(cfg: RunConfig, timeout_s: float = 120.0) -> Any:
    """The placement group of a colocated run (packed onto as few nodes as possible), placed, or a
    one-line error when the cluster has no room for it within ``timeout_s``."""
    bundles = colocated_bundles(cfg)
    pg = placement_group(bundles, strategy="PACK")
    if not ray.wait([pg.ready()], timeout=timeout_s)[0]:
        remove_placement_group(pg)
        raise UserError(f"placement=colocated: no room for {len(bundles)} bundles of {bundles[0]} within "
                        f"{timeout_s:g} s; add GPUs/CPUs, lower learner.num and generators.num, or the num_cpus shares")
    return pg


class Colocation:
    """The one owner of a colocated run's phase order: :meth:`generating` before a rollout and
    after the update, :meth:`training` before the update. Each is a no-op in the phase it puts the
    run in (after a learner recovery the loop calls :meth:`generating` again)."""

    def __init__(self, output_dir: str | Path):
        self.phase: str | None = None
        """``generation``, ``training``, or None before the first transition."""
        self.path = Path(output_dir) / PHASES_FILE

    def placed(self, pool: Any, learners: Any) -> dict:
        """Record where every generator and learner rank runs (a ``placed`` line, step 0): bundle
        index, placement group, GPU ids, ``CUDA_VISIBLE_DEVICES`` and the device each computes on."""
        actors = {gid: where for gid, where in pool.placements().items()}
        actors.update({f"learner-{i}": {**where, "bundle_index": i} for i, where in enumerate(learners.placements())})
        row = {"step": 0, "phase": "placed", "actors": actors}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def generating(self, step: int, pool: Any, learners: Any) -> None:
        """Learner state offloaded, then the engines woken (at the first call they are awake already)."""
        if self.phase == "generation":
            return
        moved = learners.offload()
        reports = pool.wake_up() if self.phase == "training" else {}
        self._record(step, "generation", reports, moved)

    def training(self, step: int, pool: Any, learners: Any) -> None:
        """The engines asleep, then the learner state back on its device."""
        if self.phase == "training":
            return
        reports = pool.sleep()
        moved = learners.reload()
        self._record(step, "training", reports, moved)

    def _record(self, step: int, phase: str, reports: dict[str, dict], moved: int) -> None:
        self.phase = phase
        row = {"step": step, "phase": phase, "engine_memory_released": any(r["released"] for r in reports.values()),
               "learner_bytes_moved": int(moved), "engines": {gid: r["events"] for gid, r in reports.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.debug("colocated step %d: %s", step, row)
