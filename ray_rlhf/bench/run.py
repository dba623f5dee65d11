"""``ray-rlhf bench`` / ``python -m ray_rlhf.bench``: every benchmark of one run's config, in one run.

    ray-rlhf bench [--config my_run.yaml] [key.sub=value ...] [--quick] [--sweep generators.num=1,2,4]

Measures the config as a run would use it (same constructors, resources, Ray cluster: it joins
``RAY_ADDRESS`` when set, e.g. under ``ray job submit``, else starts a private local Ray) and
writes ``results.json``, ``results.md`` and PNG plots to ``--out`` (default
``bench-results/<timestamp>/`` in the current directory). Sections, in order: memory-copy
bandwidth, end to end (+ actor memory), the bound's standalone parts with the learner's FLOPs,
weight sync at the run's size, the transformers baseline, this machine's matmul peak (MFU);
with ``--sweep KEY=V1,V2,...`` the end-to-end section again for each value of one key.

Without ``--config``: the ``small`` preset, plus weight sync on the tiny and medium models too
(``--quick``: the ``tiny`` preset, fewer steps, under 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import ray

from ray_rlhf.bench import bound as bound_mod
from ray_rlhf.bench import flops as flops_mod
from ray_rlhf.bench import generation, report, weightsync
from ray_rlhf.bench.args import build_parser, parse_sweep
from ray_rlhf.bench.common import kill, start_generators, start_learner, step_batches
from ray_rlhf.bench.endtoend import run_endtoend
from ray_rlhf.bench.overlap import run_overlap
from ray_rlhf.config import load_config
from ray_rlhf.models.factory import parameter_count
from ray_rlhf.run.cluster import init_ray
from ray_rlhf.run.inputs import load_prompt_items, load_tokenizer, resolve_policy_path
from ray_rlhf.telemetry.cpu import describe_cpu

log = logging.getLogger("ray_rlhf.bench")

MODES = {
    # steps: PPO steps end to end (step 1 is warm-up); learner_steps: standalone learner steps (T);
    # hf_steps: batches for the transformers baseline; sync_sizes: model presets of section 4
    # (only without --config: a user's config is measured at its own model's size).
    "full": dict(preset="small", steps=8, learner_steps=4, hf_steps=2, sync_sizes=("tiny", "small", "medium"),
                 sync_repeats=3, overlap_steps=6),
    "quick": dict(preset="tiny", steps=3, learner_steps=3, hf_steps=1, sync_sizes=("tiny",), sync_repeats=2, overlap_steps=0),
}
SWEEP_MEANS = ("samples_per_s", "generated_tokens_per_s", "step", "generate", "reward", "prepare", "update", "sync",
               "orchestration", "sync_seconds_no_verify")
MULTI_TURN_MEANS = ("env", "engine_busy_fraction", "turns_mean")


def _bench_overrides(out_dir: Path, steps: int, cache_dir: str | None) -> list[str]:
    return [f"steps={steps}", f"output_dir={out_dir}", *([f"model.cache_dir={cache_dir}"] if cache_dir else []),
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.rollouts=false",
            "checkpoint.every=0", "checkpoint.resume=never"]


def main(argv=None, prog: str = "ray-rlhf bench") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_bench(args)


def run_bench(args) -> int:
    if args.learner_packing:
        from ray_rlhf.bench import packing

        result = packing.run(args.quick, args.out, args.cache_dir)
        print(f"response lengths lognormal median {result['median']} sigma {result['sigma']}, {result['rows']} rows, "
              f"preset {result['preset']}, CPU {describe_cpu()}\n{packing.table(result)}")
        return 0
    mode = "quick" if args.quick else "full"
    m = dict(MODES[mode])
    if args.steps:
        m["steps"] = max(2, args.steps)
    if args.config is not None:
        m["sync_sizes"] = ()
    config = args.config or m["preset"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("bench-results") / stamp).resolve()
    sweep = parse_sweep(args.sweep)
    # every config (the base one and each sweep value) is checked before anything starts
    cfg = load_config(config, [*args.overrides, *_bench_overrides(out / "run", m["steps"], args.cache_dir)])
    sweep_cfgs = []
    if sweep:
        key, values = sweep
        for i, v in enumerate(values):
            over = [*args.overrides, f"{key}={v}", *_bench_overrides(out / f"sweep-{i}" / "run", m["steps"], args.cache_dir)]
            sweep_cfgs.append((v, load_config(config, over)))
    out.mkdir(parents=True, exist_ok=True)
    for d in ["run", "overlap", *(f"sweep-{i}" for i in range(len(sweep_cfgs)))]:
        shutil.rmtree(out / d, ignore_errors=True)  # the runs of a previous benchmark in this dir
    t_start = time.perf_counter()
    _init_ray(cfg, args.ray_address or os.environ.get("RAY_ADDRESS"))
    try:
        results = measure(cfg, m, mode)
        results["config"].update(config=config, overrides=list(args.overrides))
        if sweep:
            results["sweep"] = run_sweep(sweep[0], sweep_cfgs, base=(cfg, results["endtoend"]))
        if m["overlap_steps"]:  # section 6: sync vs async on disjoint cores
            common = [o for o in _bench_overrides(out, m["overlap_steps"], args.cache_dir)
                      if not o.startswith(("steps=", "output_dir="))]
            results["overlap"] = run_overlap(config, [*args.overrides, *common], out / "overlap", m["overlap_steps"])
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


def run_sweep(key: str, cfgs: list, base: tuple | None = None) -> dict:
    """The end-to-end section once per value of ``key``; throughput relative to the first value.
    A value whose config is the base run's (``base``: its config and end-to-end section; e.g.
    ``generators.num=2`` where the config already has 2) reuses that run instead of repeating it."""
    rows = []
    for value, cfg in cfgs:
        if base is not None and same_run(cfg, base[0]):
            log.info("sweep %s=%s: the end-to-end section's run (same config)", key, value)
            e2e = base[1]
        else:
            log.info("sweep %s=%s", key, value)
            e2e = run_endtoend(cfg)
        rows.append(report.sweep_row(value, e2e, SWEEP_MEANS + (MULTI_TURN_MEANS if e2e["multi_turn"] else ())))
    for r in rows:
        r["speedup"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    return {"key": key, "rows": rows}


def same_run(a, b) -> bool:
    """Two configs that differ at most in where they write (``output_dir``)."""
    return a.model_dump(exclude={"output_dir"}) == b.model_dump(exclude={"output_dir"})


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

    weights: dict = {}  # step -> the policy it ended with (synchronous runs): the bound's generation replays them
    e2e = run_endtoend(cfg, weights)  # section 1 + memory (section 5)

    policy_path = resolve_policy_path(cfg)
    prompts = load_prompt_items(cfg, load_tokenizer(policy_path))
    batches = step_batches(cfg, prompts, cfg.steps)
    from transformers import AutoConfig

    shape = flops_mod.Shape.of(AutoConfig.from_pretrained(str(policy_path)))
    trunk_values = cfg.uses_critic and not cfg.model.critic_path
    flops_of = flops_mod.learner_flops_of(shape, cfg.ppo.epochs, not cfg.old_logprobs_from_sampler or trunk_values)
    gens = start_generators(cfg, policy_path, cfg.generators.num, tag="bench")
    learner = start_learner(cfg, policy_path)
    try:
        bound = bound_mod.run_bound(cfg, batches, gens, learner, m["learner_steps"], flops_of, weights)  # section 2
        weights.clear()
        params = parameter_count(policy_path)
        counts = tuple(range(1, min(2, len(gens)) + 1))
        sync_rows = weightsync.measure(learner, gens, cfg.model.preset or "run", params, m["sync_repeats"], counts)  # section 4
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

    mfu = measure_mfu(cfg, shape, bound)
    import torch
    import vllm

    return {
        "mode": mode,
        "machine": f"{describe_cpu()}, {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
                   f"vllm {vllm.__version__}, ray {ray.__version__}",
        "config": {"preset": cfg.model.preset or "custom", "steps": cfg.steps, "warmup_steps_skipped": 1,
                   "prompts_per_step": cfg.rollout.prompts_per_step,
                   "samples_per_prompt": cfg.rollout.samples_per_prompt,
                   "max_new_tokens": cfg.rollout.max_new_tokens, "generators": cfg.generators.num,
                   "generator_num_cpus": cfg.generators.num_cpus, "shard_prompts": cfg.generators.shard_prompts,
                   "learner_num_cpus": cfg.learner.num_cpus, "sync_backend": cfg.sync.backend,
                   "sync_verify": cfg.sync.verify, "estimator": cfg.algo.estimator,
                   "old_logprobs_from_sampler": cfg.old_logprobs_from_sampler, "learner_num": cfg.learner.num,
                   "env": cfg.env.name, "env_scheduling": cfg.env.scheduling},
        "cpu": describe_cpu(),
        "model_params": params,
        "endtoend": e2e,
        "bound": bound_mod.summarize_bound(bound, e2e["weight_bytes"], bandwidth, e2e["mean"]["step"]),
        "generation": generation.compare(e2e, bound, hf),
        "weight_sync": sync_rows,
        "memory": e2e["memory"],
        "mfu": mfu,
    }


def measure_mfu(cfg, shape, bound: dict) -> dict:
    """This machine's matmul peak at the learner's shapes and threads, and the learner's MFU."""
    import torch

    from ray_rlhf.learning.group import learner_options
    from ray_rlhf.learning.learner import default_threads

    threads = cfg.learner.torch_threads or default_threads(learner_options(cfg, 0))  # as rank 0 resolves them
    learned = [r for r in bound["per_step"] if "real_tokens" in r]
    per_seq = sum(r["real_tokens"] for r in learned) / max(sum(r["sequences"] for r in learned) * cfg.ppo.epochs, 1)
    tokens = int(cfg.ppo.micro_batch_tokens or max(1, cfg.ppo.micro_batch_size * per_seq))
    peaks = {"float32": flops_mod.matmul_peak(shape, tokens, threads)}
    if flops_mod.cpu_has_bf16():
        peaks["bfloat16"] = flops_mod.matmul_peak(shape, tokens, threads, torch.bfloat16)
    return flops_mod.mfu_summary(bound["per_step"], peaks, threads, tokens)


if __name__ == "__main__":
    from ray_rlhf.run.command import run_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_command(run_bench, build_parser("python -m ray_rlhf.bench.run").parse_args()))
