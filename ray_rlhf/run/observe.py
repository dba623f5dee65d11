"""What a run shows while it runs: the metrics logger and its sinks, and the live gauges.

Every step's row goes to ``metrics.jsonl``, TensorBoard and the progress bar
(:class:`~ray_rlhf.metrics.MetricsLogger`) and, through the same path, to Ray's metrics
(Prometheus, the Ray dashboard: ``logging.ray_metrics``) and Weights & Biases (``logging.wandb``).
Between steps the driver sets the live gauges (pool size, shards queued, generator utilisation,
weight version) and the bytes-synced counter (:mod:`ray_rlhf.telemetry.sinks`).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.learning.stats import LearnerStats
from ray_rlhf.metrics import MetricsLogger, rollout_stats
from ray_rlhf.run.rollouts import StepRollouts
from ray_rlhf.sync.types import SyncResult
from ray_rlhf.telemetry.sinks import GENERATOR_UTILIZATION, POOL_SHARDS_QUEUED, POOL_SIZE, SYNC_BYTES, WEIGHT_VERSION

log = logging.getLogger(__name__)


def open_metrics(cfg: RunConfig, start: int, resumed: int | None) -> MetricsLogger:
    """The run's metrics logger with every sink the config asks for."""
    sinks = []
    if cfg.logging.ray_metrics:
        from ray_rlhf.telemetry.ray_metrics import RayMetricsSink, metrics_urls

        sinks.append(RayMetricsSink(cfg.name))
        log.info("metrics exported through Ray: %s", ", ".join(metrics_urls().values()) or "(no endpoint found)")
    if cfg.logging.wandb is not None:
        from ray_rlhf.telemetry.wandb_sink import WandbSink

        w = cfg.logging.wandb
        sinks.append(WandbSink(w.project, name=w.name or cfg.name, mode=w.mode, entity=w.entity,
                               dir=Path(cfg.output_dir) / "wandb", config=cfg.model_dump(mode="json")))
    return MetricsLogger(cfg.output_dir, total_steps=cfg.steps, start_step=start, tensorboard=cfg.logging.tensorboard,
                         progress_bar=cfg.logging.progress_bar, resume_from_step=resumed, sinks=sinks)


def live_step(metrics: MetricsLogger, row: dict) -> None:
    """The live gauges after a step (its row: docs/metrics.md keys)."""
    metrics.gauge(POOL_SIZE, row["pool/size"])
    metrics.gauge(GENERATOR_UTILIZATION, row["perf/generator_utilization"])
    metrics.gauge(WEIGHT_VERSION, row["policy_version"])
    metrics.increment(SYNC_BYTES, row["sync/bytes"] or 0)


def queue_gauge(metrics: MetricsLogger):
    """The pool's callback for the shards waiting for a free generator."""
    return lambda queued: metrics.gauge(POOL_SHARDS_QUEUED, queued)


class PhaseTimer:
    """``with timer("generate"): ...`` records the seconds of each phase of one step."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = time.perf_counter() - t0


def step_metrics(batch: StepRollouts, stats: LearnerStats, synced: SyncResult, timer: PhaseTimer,
                 pool_size: int) -> dict[str, float]:
    """One flat row of the metrics JSONL (every key is documented in docs/metrics.md)."""
    step_s = time.perf_counter() - timer.t0
    summary, events = batch.summary, batch.events
    load = batch.synced or synced  # async: the load of the weights this step was sampled with
    row = {"policy_version": stats.version}
    row.update(rollout_stats(summary, learner_version=stats.version - 1))
    row.update(stats.metrics())  # each field of the learner's record names its key
    row["perf/padded_token_ratio"] = stats.padded_tokens / max(stats.real_tokens, 1)
    row.update({f"time/{k}": v for k, v in batch.seconds.items()})
    row.update({f"time/{k}": v for k, v in timer.seconds.items() if k != "rollout"})
    overlapped = "learner_wait" in batch.seconds  # async: the driver waited only for what was not ready
    waited = timer.seconds["rollout"] if overlapped else batch.seconds["generate"] + batch.seconds["reward"]
    batch.seconds.setdefault("generate", 0.0)
    row.update({
        "time/step": step_s,
        "time/orchestration": step_s - waited - sum(v for k, v in timer.seconds.items() if k != "rollout"),
        "perf/generated_tokens_per_s": summary.response_tokens / max(batch.seconds.get("generate", 0.0), 1e-9),
        "perf/samples_per_s": summary.count / max(step_s, 1e-9),
        "perf/generator_utilization": min(1.0, batch.seconds["generate"] / max(step_s, 1e-9)),
        "perf/learner_utilization": min(1.0, timer.seconds["learn"] / max(step_s, 1e-9)),
        "sync/seconds": load.seconds,
        "sync/bytes": load.bytes,
        "sync/verify_seconds": load.verify_seconds,
        "sync/verified": float(bool(load.checksum)),
        "pool/size": pool_size,
        "pool/deaths": len(events.died),
        "pool/requeued_shards": events.requeued_shards,
    })
    if load.probe_max_diff is not None:  # lora.sync=adapter with sync.verify
        row["sync/probe_logprob_diff"] = load.probe_max_diff
    if events.env:  # env.name: multi-turn rollouts
        row.update(env_metrics(events.env))
    if batch.sampling_rounds is not None:  # rollout.dynamic_sampling
        row["rollout/sampling_rounds"] = batch.sampling_rounds
        row["rollout/discarded_groups"] = batch.discarded_groups
    return row


def env_metrics(env: dict[str, float]) -> dict[str, float]:
    """The ``env/*`` metrics of a step from the summed environment counts of its shards
    (:class:`~ray_rlhf.generation.trajectory.EnvStats`; defined in docs/metrics.md)."""
    n = max(env.get("trajectories", 0), 1)
    busy = {"perf/engine_busy_fraction": env["engine_seconds"] / env["wall_seconds"]} if env.get("wall_seconds") else {}
    return busy | {
        "env/turns_mean": env.get("turns", 0) / n,
        "env/tool_calls": env.get("tool_calls", 0),
        "env/tool_errors": env.get("tool_errors", 0),
        "env/seconds": env.get("seconds", 0.0),
        "env/observation_tokens": env.get("observation_tokens", 0),
        "env/errors": env.get("errors", 0),
        "env/reward_mean": env.get("reward_sum", 0.0) / n,
    }
