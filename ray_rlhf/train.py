"""The PPO driver: ``python -m ray_rlhf.train --config tiny [key.sub=value ...]``.

One cycle per step, one line per phase, each phase timed::

    prompts  -> generate (GeneratorPool, vLLM)  -> score (RewardActor)
             -> learn (LearnerActor: old/ref logprobs, values, GAE, PPO epochs)
             -> broadcast weights v+1 to every generator (+ checksum verify) -> log, checkpoint

The driver calls ``ray.init()``: it joins ``RAY_ADDRESS`` (or ``ray.address``) when set, as under
``ray job submit``, and starts a local Ray otherwise. Re-running the same command resumes from the
newest complete checkpoint (``checkpoint.resume=auto``).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

import ray

from ray_rlhf import checkpoint, preflight
from ray_rlhf.config import RunConfig, to_yaml
from ray_rlhf.launch import RLHFSystem, init_ray
from ray_rlhf.metrics import MetricsLogger, RolloutLogger, rollout_stats
from ray_rlhf.pool import make_shards
from ray_rlhf.records import SamplingSpec

log = logging.getLogger("ray_rlhf")


class PhaseTimer:
    """``with timer("generate"): ...`` records seconds per phase of one step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] = time.perf_counter() - self.t0

        return _Phase()


def run(cfg: RunConfig, on_finish: Callable[[RLHFSystem], None] | None = None,
        on_step_end: Callable[[int, RLHFSystem], None] | None = None) -> Path:
    """Run (or resume) a PPO training; returns the output directory.

    ``on_finish(system)``, if given, is called with the live actors after the last step and before
    they are shut down (the benchmarks read each actor's peak memory there). ``on_step_end(step,
    system)``, if given, is called after each step is logged and checkpointed, before the pool tries
    to grow (tests add and remove cluster nodes there).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(cfg.output_dir)
    # -- cheap checks of everything the user gave, before Ray, vLLM or any model is started --
    policy_path = preflight.resolve_policy_path(cfg)
    tokenizer = preflight.load_tokenizer(policy_path)
    prompts = preflight.load_and_check_prompts(cfg, tokenizer)
    preflight.check_reward(cfg, prompts)
    checkpoint.check_writable(out)
    resume_dir = checkpoint.resolve_resume(out, cfg.checkpoint.resume)
    resumed = checkpoint.validate(resume_dir) if resume_dir else None
    if resume_dir:
        checkpoint.check_compatible(resume_dir, policy_path)
        changed = checkpoint.config_changes(resumed.get("config"), cfg.model_dump(mode="json"))
        if changed:
            log.warning("resuming %s with a changed config (%s): the run will differ from the one it continues",
                        resume_dir, ", ".join(changed))
    log.info("resolved config:\n%s", to_yaml(cfg))
    (out / "config.yaml").write_text(to_yaml(cfg))

    init_ray(cfg)
    system = RLHFSystem(cfg, policy_path, prompts)
    start = system.resume(resume_dir, resumed) if resume_dir else 0
    metrics = MetricsLogger(out, total_steps=cfg.steps, start_step=start, tensorboard=cfg.logging.tensorboard,
                            progress_bar=cfg.logging.progress_bar, resume_from_step=start if resume_dir else None)
    samples = RolloutLogger(out, resume_from_step=start) if cfg.logging.rollouts else None
    try:
        for step in range(start + 1, cfg.steps + 1):
            timer, t0 = PhaseTimer(), time.perf_counter()
            batch = system.stream.next_batch(cfg.rollout.prompts_per_step)
            sampling = SamplingSpec(n=cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    seed=cfg.seed * 1_000_003 + step)
            with timer("generate"):
                rollouts, events = system.pool.generate(make_shards(batch, cfg.generators.shard_prompts), sampling,
                                                        kill_after_dispatch=system.faults_at(step))
            if cfg.faults.kill_reward_at_step == step:
                system.kill_reward()
            with timer("reward"):
                scored = ray.get(system.reward.score.remote(rollouts))
            with timer("learn"):
                stats = ray.get(system.learner.step.remote(scored))
            with timer("sync"):
                synced = system.broadcast(stats.version)
            with timer("log"):
                row = step_metrics(step, scored, stats, synced, events, timer, t0, len(system.pool))
                metrics.log(step, row)
                if samples:
                    samples.write(step, scored)
            if step == cfg.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                system.save_checkpoint(out, step)
            if cfg.faults.stop_after_step == step and step < cfg.steps:
                log.warning("fault injection: stopping after step %d (re-run the same command to resume)", step)
                break
            if on_step_end:
                on_step_end(step, system)
            system.maybe_grow()
        if on_finish:
            on_finish(system)
    finally:
        metrics.close()
        if samples:
            samples.close()
        system.shutdown()
    print(f"metrics: {out / 'metrics.jsonl'}  tensorboard: {out / 'tensorboard'}  rollouts: {out / 'rollouts'}")
    return out


def step_metrics(step, scored, stats, synced, events, timer, t0, pool_size) -> dict[str, float]:
    """One flat row of the metrics JSONL (every key is documented in docs/metrics.md)."""
    step_s = time.perf_counter() - t0
    tokens = sum(len(r.response_ids) for r in scored)
    row = {"step": step, "policy_version": stats.version}
    row.update(rollout_stats(scored, learner_version=stats.version - 1))
    row.update({f"ppo/{k}": v for k, v in stats.to_dict().items()})
    row.update({f"time/{k}": v for k, v in timer.seconds.items()})
    row.update({
        "time/step": step_s,
        "time/orchestration": step_s - sum(timer.seconds.values()),
        "perf/generated_tokens_per_s": tokens / max(timer.seconds["generate"], 1e-9),
        "perf/samples_per_s": len(scored) / max(step_s, 1e-9),
        "sync/seconds": synced.seconds,
        "sync/bytes": synced.bytes,
        "sync/verify_seconds": synced.verify_seconds,
        "sync/verified": float(bool(synced.checksum)),
        "pool/size": pool_size,
        "pool/deaths": len(events.died),
        "pool/requeued_shards": events.requeued_shards,
    })
    return row


def main(argv: list[str] | None = None) -> int:
    from ray_rlhf.cli import run_command, train_parser

    args = train_parser(prog="python -m ray_rlhf.train").parse_args(argv)
    return run_command(lambda a: _run_from_args(a), args)


def _run_from_args(args) -> None:
    from ray_rlhf.config import load_config

    run(load_config(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
