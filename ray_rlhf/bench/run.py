"""``python -m ray_rlhf.bench.run [--quick] [--out DIR]``: every benchmark in one run.

Writes ``results.json``, ``results.md`` and PNG plots to ``DIR`` (default
``benchmarks/results/<timestamp>/``). Full mode: the ``small`` preset, weight sync on tiny, small
and medium models. ``--quick``: the ``tiny`` preset, fewer steps, weight sync on tiny only
(under 3 minutes on 2 cores). Sections, in order: memory-copy bandwidth, end to end (+ actor
memory), the bound's standalone parts, weight sync at the run's size, transformers baseline,
weight sync at the other sizes; then the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import ray

from ray_rlhf import preflight
from ray_rlhf.bench import bound as bound_mod
from ray_rlhf.bench import generation, report, weightsync
from ray_rlhf.bench.common import kill, start_generators, start_learner, step_batches
from ray_rlhf.bench.endtoend import run_endtoend
from ray_rlhf.config import load_config
from ray_rlhf.models.factory import parameter_count
from ray_rlhf.run.cluster import init_ray

log = logging.getLogger("benchmarks")

MODES = {
    # steps: PPO steps end to end (step 1 is warm-up); learner_steps: standalone learner steps (T);
    # hf_steps: batches for the transformers baseline; sync_sizes: model presets of section 4.
    "full": dict(preset="small", steps=8, learner_steps=4, hf_steps=2, sync_sizes=("tiny", "small", "medium"),
                 sync_repeats=3),
    "quick": dict(preset="tiny", steps=3, learner_steps=3, hf_steps=1, sync_sizes=("tiny",), sync_repeats=2),
}


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m ray_rlhf.bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, few steps, one sync size (< 3 min)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results/<timestamp>)")
    ap.add_argument("--steps", type=int, default=None, help="PPO steps end to end (default: 8 full, 3 quick)")
    ap.add_argument("--cache-dir", default="runs/models", help="where the offline models are built once")
    ap.add_argument("--ray-address", default=None,
                    help="Ray cluster to run on (default: RAY_ADDRESS if set, else a private local Ray)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    mode = "quick" if args.quick else "full"
    m = dict(MODES[mode])
    if args.steps:
        m["steps"] = max(2, args.steps)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("benchmarks/results") / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "run", ignore_errors=True)  # the PPO run of a previous benchmark in this dir
    cfg = load_config(m["preset"], [
        f"steps={m['steps']}", f"output_dir={out / 'run'}", f"model.cache_dir={args.cache_dir}",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.rollouts=false",
        "checkpoint.every=0", "checkpoint.resume=never",
    ])
    t_start = time.perf_counter()
    _init_ray(cfg, args.ray_address or os.environ.get("RAY_ADDRESS"))
    try:
        results = measure(cfg, m, mode)
    finally:
        ray.shutdown()
    results.update(timestamp=stamp, wall_seconds=time.perf_counter() - t_start)
    results["targets"] = report.targets(results)
    results["plots"] = report.plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report.markdown(results))
    print(report.markdown(results))
    print(f"results: {out}  ({results['wall_seconds']:.0f} s)")
    return 0


def _init_ray(cfg, address: str | None) -> None:
    """Join ``address`` as the trainer would; else start a private local Ray. A plain
    ``ray.init()`` would join any cluster already started on this machine (e.g. by another job's
    ``ray start``) and measure its other work too."""
    if address:
        cfg.ray.address = address
    init_ray(cfg, private=not address)


def measure(cfg, m: dict, mode: str) -> dict:
    bandwidth = bound_mod.copy_bandwidth()
    log.info("memory-copy bandwidth %.2f GB/s", bandwidth / 1e9)

    e2e = run_endtoend(cfg)  # section 1 + memory (section 5)

    policy_path = preflight.resolve_policy_path(cfg)
    prompts = preflight.load_and_check_prompts(cfg, preflight.load_tokenizer(policy_path))
    batches = step_batches(cfg, prompts, cfg.steps)
    gens = start_generators(cfg, policy_path, cfg.generators.num, tag="bench")
    learner = start_learner(cfg, policy_path)
    try:
        bound = bound_mod.run_bound(cfg, batches, gens, learner, m["learner_steps"])  # section 2
        params = parameter_count(policy_path)
        counts = tuple(range(1, min(2, len(gens)) + 1))
        sync_rows = weightsync.measure(learner, gens, cfg.model.preset, params, m["sync_repeats"], counts)  # section 4
    finally:
        kill(gens + [learner])  # frees their CPU share for the transformers actors
    samplers = generation.start_hf(cfg, policy_path, cfg.generators.num)
    try:
        hf = generation.hf_tokens_per_s(samplers, batches[1:1 + m["hf_steps"]])  # section 3
    finally:
        kill(samplers)
    for size in m["sync_sizes"]:
        if size != cfg.model.preset:
            sync_rows += weightsync.run_size(cfg, size, m["sync_repeats"])
    sync_rows.sort(key=lambda r: (r["bytes"], r["backend"], r["generators"]))

    import torch
    import vllm

    return {
        "mode": mode,
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
                   f"vllm {vllm.__version__}, ray {ray.__version__}",
        "config": {"preset": cfg.model.preset, "steps": cfg.steps, "warmup_steps_skipped": 1,
                   "prompts_per_step": cfg.rollout.prompts_per_step,
                   "samples_per_prompt": cfg.rollout.samples_per_prompt,
                   "max_new_tokens": cfg.rollout.max_new_tokens, "generators": cfg.generators.num,
                   "generator_num_cpus": cfg.generators.num_cpus, "shard_prompts": cfg.generators.shard_prompts,
                   "learner_num_cpus": cfg.learner.num_cpus, "sync_backend": cfg.sync.backend,
                   "sync_verify": cfg.sync.verify},
        "model_params": params,
        "endtoend": e2e,
        "bound": bound_mod.summarize_bound(bound, e2e["weight_bytes"], bandwidth, e2e["mean"]["step"]),
        "generation": generation.compare(e2e, bound, hf),
        "weight_sync": sync_rows,
        "memory": e2e["memory"],
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
