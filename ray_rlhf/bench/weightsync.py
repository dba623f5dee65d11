"""Section 4: weight-sync time vs model size and vs number of generators, both backends.

Real actors: a learner actor holding the model and
:class:`~ray_rlhf.generation.generator.Generator` actors with in-process vLLM engines. One sync =
:meth:`ray_rlhf.sync.broadcaster.WeightBroadcaster.publish` (the call the driver makes every step)
with ``verify`` off, so the time is the transfer plus the engines' weight load.
``object_store``: one ``ray.put`` pulled by every generator; ``collective``: a gloo broadcast over
a group opened for those generators. Each configuration runs ``repeats + 1`` syncs; the first is a
warm-up and the median of the rest is reported.
"""

from __future__ import annotations

import statistics

import ray

from ray_rlhf.bench.common import kill, start_generators, start_learner
from ray_rlhf.models.factory import ensure_model, parameter_count
from ray_rlhf.sync.broadcaster import WeightBroadcaster

BACKENDS = ("object_store", "collective")


def measure(learner, generators: list, model: str, params: int, repeats: int, counts=(1, 2)) -> list[dict]:
    """Rows of (model, backend, generators, median seconds, bytes) for each generator count."""
    rows, version = [], 10_000  # far from the run's versions; generators just take what they are sent
    for n in counts:
        handles = {f"g{i}": g for i, g in enumerate(generators[:n])}
        for backend in BACKENDS:
            broadcaster = WeightBroadcaster(learner, backend, verify=False)
            times, nbytes = [], 0
            try:
                for _ in range(repeats + 1):  # the first collective publish also opens the group
                    version += 1
                    res = broadcaster.publish(version, handles)
                    times.append(res.seconds)
                    nbytes = res.bytes
            finally:
                broadcaster.close(handles)
            med = statistics.median(times[1:])
            rows.append({"model": model, "params": params, "backend": backend, "generators": n, "bytes": nbytes,
                         "seconds": med, "all_seconds": times, "bytes_per_s": nbytes * n / med})
    return rows


def run_size(cfg, preset: str, repeats: int) -> list[dict]:
    """Start a learner and 2 generators on the ``preset`` model, measure, stop them."""
    path = ensure_model("policy", preset, cfg.model.cache_dir, seed=cfg.model.init_seed)
    learner = start_learner(cfg, path)
    gens = start_generators(cfg, path, 2, tag=f"sync-{preset}")
    try:
        ray.get([g.ping.remote() for g in gens] + [learner.ping.remote()])
        return measure(learner, gens, preset, parameter_count(path), repeats)
    finally:
        kill(gens + [learner])
