"""Section 6: synchronous vs asynchronous PPO on disjoint cores, in one benchmark run.

The same config twice, end to end: ``rollout.max_staleness=0`` (the synchronous loop) and ``=1``
(generation of step s+1 overlaps training on step s). So that the two sides do not slow each
other down by sharing cores, the learner rank is pinned to the first ``learner_cores`` cores
(``learner.pin_cores``, that many torch threads) and every generator to the remaining ones
(``generators.omp_threads_bind``). From the synchronous run: ``G`` = mean ``time/generate`` and
``T`` = mean ``prepare + update`` seconds. A synchronous step costs about ``G + T`` (+ reward and
sync); an overlapped one approaches ``max(G, T)``: the report gives each step time against both.
"""

from __future__ import annotations

import os

from ray_rlhf.bench.endtoend import run_endtoend
from ray_rlhf.config import load_config


def split_cores(learner_cores: int = 1) -> tuple[list[int], list[int]]:
    """(learner cores, generator cores) over the cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError("the sync-vs-async section needs at least 2 cores (one per side)")
    k = min(learner_cores, len(cores) - 1)
    return cores[:k], cores[k:]


def _core_list(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


def run_overlap(config: str, overrides: list[str], out_dir, steps: int) -> dict:
    """Both runs of ``config`` (+ ``overrides``); means over steps after the warm-up."""
    learner, gens = split_cores()
    pinning = ["learner.pin_cores=true", f"learner.torch_threads={len(learner)}",
               f"generators.omp_threads_bind={_core_list(gens)}", "sync.backend=object_store"]
    rows = {}
    for k in (0, 1):
        cfg = load_config(config, [*overrides, *pinning, f"rollout.max_staleness={k}", f"steps={steps}",
                                   f"output_dir={out_dir}/staleness-{k}"])
        e2e = run_endtoend(cfg)["mean"]
        rows[k] = {"step": e2e["step"], "generate": e2e["generate"], "learner": e2e["prepare"] + e2e["update"],
                   "samples_per_s": e2e["samples_per_s"]}
    G, T = rows[0]["generate"], rows[0]["learner"]
    return {"learner_cores": learner, "generator_cores": gens, "G": G, "T": T, "G_plus_T": G + T,
            "max_G_T": max(G, T), "sync": rows[0], "async": rows[1],
            "speedup": rows[0]["step"] / rows[1]["step"],
            "sync_over_G_plus_T": rows[0]["step"] / (G + T), "async_over_max_G_T": rows[1]["step"] / max(G, T)}
