"""Section 2: the bound ``G + R + T + S`` -- what the parts of one PPO step cost on their own.

- ``G``: standalone vLLM generation of the same step's prompts with the same sampling parameters
  and seeds, on fresh :class:`~ray_rlhf.generation.generator.Generator` actors with the same resources as the
  run's (``generators.num`` actors, ``generators.num_cpus`` each). Each actor gets ONE shard with
  its share of the prompts (a static split, no work queue); ``G`` is the driver's wall time from
  dispatch to the last result. Weights: the ones the run's generators held for that step -- the
  policy as the previous step left it, kept by the end-to-end section in a synchronous run and
  loaded (untimed) before the step -- so each step is the loop's own work again, token for token
  where the engine is deterministic; the initial weights (version 0) for step 1, and for every
  step of an asynchronous run (whose generators mix versions).
- ``R``: the reward of those rollouts, :class:`~ray_rlhf.rewards.scorer.RewardScorer` in process.
- ``T``: one learner step on that batch, in a fresh learner actor with the run's resources:
  ``prepare_seconds + update_seconds`` measured inside the actor (no Ray transfer).
- ``S``: weight bytes / memory-copy bandwidth, the bandwidth being the best of a few copies of a
  large torch tensor in the driver (one copy of the weights at memcpy speed).

Per-step values are averaged without the warm-up step, as in the end-to-end section.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import ray
import torch

from ray_rlhf.bench.common import mean_after_warmup
from ray_rlhf.generation.pool import make_shards
from ray_rlhf.rewards.scorer import RewardScorer
from ray_rlhf.sync.receiver import WeightReceiver
from ray_rlhf.sync.remote import call


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` for a ``nbytes`` float32 tensor (best of ``repeats``)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def generate_standalone(generators: list, batch, sampling) -> tuple[list, float]:
    """All of ``batch`` on ``generators``, one shard each; returns (batches in prompt order, seconds)."""
    shards = make_shards(batch, math.ceil(len(batch) / len(generators)))
    t0 = time.perf_counter()
    refs = [g.generate.options(num_returns=2).remote(s, sampling) for g, s in zip(generators, shards)]
    results = ray.get([batch for _, batch in refs])
    seconds = time.perf_counter() - t0
    return results, seconds


def load_weights(generators: list, version: int, state: dict) -> None:
    """Load ``state`` into every generator as ``version`` (not timed: the run's sync is measured
    on its own)."""
    ref = ray.put(state)
    ray.get([call(g, WeightReceiver.load, version, ref, False) for g in generators])


def run_bound(cfg, batches, generators, learner, learner_steps: int, flops_of=None, weights: dict | None = None) -> dict:
    """Per-step G, R (all ``batches``) and T (first ``learner_steps``); with ``flops_of`` (a scored
    batch -> ``{"prepare": FLOPs, "update": FLOPs}``, :func:`ray_rlhf.bench.flops.step_flops`) the
    model FLOPs of each learner step too. ``weights`` (step -> state dict, from
    :func:`~ray_rlhf.bench.endtoend.run_endtoend`): step ``s`` generates with ``weights[s - 1]``
    where it is there."""
    rc = cfg.reward
    scorer = RewardScorer([(f.name, f.weight) for f in rc.functions], rc.model_path, rc.model_weight, rc.batch_size,
                          env_rewards=cfg.env.multi_turn)  # an environment may be the only reward source
    ray.get([g.ping.remote() for g in generators] + [learner.ping.remote()])
    per_step = []
    weights = weights or {}
    for i, (step, batch, sampling) in enumerate(batches):
        loop_weights = step - 1 in weights
        if loop_weights:
            load_weights(generators, step - 1, weights[step - 1])
        rollouts, g_s = generate_standalone(generators, batch, sampling)
        t0 = time.perf_counter()
        scored, _ = scorer.score(*rollouts)
        # T measures the learner's compute on this batch; its generators keep the initial weights,
        # so the batch is labelled with the learner's version (no staleness to refuse).
        scored = dataclasses.replace(scored, policy_version=np.full(len(scored), i, dtype=np.int64))
        r_s = time.perf_counter() - t0
        row = {"step_index": step, "G": g_s, "R": r_s, "tokens": int(scored.model_mask.sum()),  # model tokens only
               "sequences": len(scored), "loop_weights": loop_weights}
        if i < learner_steps:
            t0 = time.perf_counter()
            stats = ray.get(learner.step.remote(scored))
            row.update(T=stats.prepare_seconds + stats.update_seconds, T_wall=time.perf_counter() - t0,
                       T_prepare=stats.prepare_seconds, T_update=stats.update_seconds,
                       padded_tokens=stats.padded_tokens, real_tokens=stats.real_tokens)
            if flops_of is not None:
                f = flops_of(scored)
                row.update(flops_prepare=f["prepare"], flops_update=f["update"])
        per_step.append(row)
    G = mean_after_warmup([r["G"] for r in per_step])
    R = mean_after_warmup([r["R"] for r in per_step])
    T = mean_after_warmup([r["T"] for r in per_step if "T" in r])
    kept = per_step[1:] or per_step
    learned = [r for r in per_step if "T" in r]
    return {"per_step": per_step, "G": G, "R": R, "T": T,
            "T_wall": mean_after_warmup([r["T_wall"] for r in learned]),
            "T_prepare": mean_after_warmup([r["T_prepare"] for r in learned]),
            "T_update": mean_after_warmup([r["T_update"] for r in learned]),
            "mean_response_length": sum(r["tokens"] for r in kept) / sum(r["sequences"] for r in kept),
            "standalone_tokens_per_s": sum(r["tokens"] for r in kept) / sum(r["G"] for r in kept),
            "generators": len(generators), "learner_steps": learner_steps}


def summarize_bound(bound: dict, weight_bytes: int, bandwidth: float, step_seconds: float) -> dict:
    """Add ``S`` and the efficiencies to a :func:`run_bound` result."""
    S = weight_bytes / bandwidth
    total = bound["G"] + bound["R"] + bound["T"] + S
    return {**bound, "S": S, "copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes": weight_bytes,
            "sum": total, "step_seconds": step_seconds, "efficiency": total / step_seconds,
            "overlap_bound": max(bound["G"], bound["T"]),
            "efficiency_vs_overlap": max(bound["G"], bound["T"]) / step_seconds}
