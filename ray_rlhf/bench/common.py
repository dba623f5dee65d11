"""Helpers shared by the benchmark sections: actors (through the run's own constructors), step
batches, peak memory, averages."""

from __future__ import annotations

import math
import os
import resource
import statistics

import ray

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.learning.group import LearnerGroup
from ray_rlhf.records import PromptItem, SamplingSpec
from ray_rlhf.run.actors import generator_actor, generator_kwargs

WARMUP_STEPS = 1
"""Steps left out of every per-step average: step 1 pays one-off costs (first kernels, allocator)."""


def step_batches(cfg: RunConfig, prompts: list[PromptItem], steps: int) -> list[tuple[int, list[PromptItem], SamplingSpec]]:
    """The (step, prompts, sampling) of steps 1..``steps``, exactly as the driver draws them."""
    stream = PromptStream(prompts, seed=cfg.seed)
    return [(step, stream.next_batch(cfg.rollout.prompts_per_step), SamplingSpec.for_step(cfg.rollout, cfg.seed, step))
            for step in range(1, steps + 1)]


def start_generators(cfg: RunConfig, model_path, n: int, tag: str) -> list:
    """``n`` Generator actors built exactly as a run builds them (resources and engine settings)."""
    cls = generator_actor(cfg)
    return [cls.remote(**generator_kwargs(cfg, model_path, f"{tag}-{i}")) for i in range(n)]


def start_learner(cfg: RunConfig, model_path):
    """A learner rank built exactly as a run builds it (a one-rank :class:`LearnerGroup`); returns its handle."""
    return LearnerGroup(cfg, model_path).source


def _peak_rss(_instance=None) -> dict:
    """This process's peak and current resident memory (``VmHWM``/``VmRSS`` of /proc/self/status)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    kib = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731
    return {"pid": os.getpid(), "peak_rss_bytes": kib("VmHWM"), "rss_bytes": kib("VmRSS")}


def actor_peak_rss(handle) -> dict:
    """Peak RSS of any actor, through Ray's ``__ray_call__`` (runs a function on the actor's instance)."""
    return ray.get(handle.__ray_call__.remote(_peak_rss))


def driver_peak_rss() -> dict:
    out = _peak_rss()
    out["peak_rss_bytes"] = max(out["peak_rss_bytes"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def mean_after_warmup(values: list[float]) -> float:
    """Mean of ``values`` without the first :data:`WARMUP_STEPS` (all of them if that leaves none)."""
    kept = values[WARMUP_STEPS:] or values
    return statistics.fmean(kept) if kept else math.nan


def kill(handles) -> None:
    for h in handles:
        try:
            ray.kill(h)
        except Exception:  # noqa: BLE001 - already gone
            pass
