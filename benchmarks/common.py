"""Helpers shared by the benchmark sections: actor start-up, step batches, peak memory, averages."""

from __future__ import annotations

import math
import os
import resource
import statistics

import ray

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.generator import Generator
from ray_rlhf.launch import LearnerActor
from ray_rlhf.records import PromptItem, SamplingSpec

WARMUP_STEPS = 1
"""Steps left out of every per-step average: step 1 pays one-off costs (first kernels, allocator)."""


def step_batches(cfg: RunConfig, prompts: list[str], steps: int) -> list[tuple[int, list[PromptItem], SamplingSpec]]:
    """The (step, prompts, sampling) of steps 1..``steps``, exactly as ``ray_rlhf.train.run`` draws them."""
    stream = PromptStream(prompts, seed=cfg.seed)
    r = cfg.rollout
    return [
        (step, stream.next_batch(r.prompts_per_step),
         SamplingSpec(n=r.samples_per_prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                      top_p=r.top_p, seed=cfg.seed * 1_000_003 + step))
        for step in range(1, steps + 1)
    ]


def start_generators(cfg: RunConfig, model_path, n: int, tag: str) -> list:
    """``n`` Generator actors with the run's resources and engine settings (as ``RLHFSystem`` starts them)."""
    g = cfg.generators
    cls = ray.remote(num_cpus=g.num_cpus, num_gpus=g.num_gpus)(Generator)
    handles = [
        cls.remote(model_path=str(model_path), generator_id=f"{tag}-{i}", max_model_len=g.max_model_len,
                   max_prompt_tokens=cfg.data.max_prompt_tokens, seed=cfg.seed,
                   tensor_parallel_size=g.tensor_parallel_size, kv_cache_gib=g.kv_cache_gib)
        for i in range(n)
    ]
    return handles


def start_learner(cfg: RunConfig, model_path):
    """A LearnerActor with the run's resources and PPO settings (as ``RLHFSystem`` starts it)."""
    lc = cfg.learner
    return ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus)(LearnerActor).remote(
        model_path=str(model_path), ppo=cfg.ppo, kl=cfg.kl, seed=cfg.seed, device=lc.device,
        temperature=cfg.rollout.temperature, critic_path=cfg.model.critic_path, torch_threads=lc.torch_threads,
    )


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
