"""Run logging: per-step metrics (JSONL, TensorBoard, progress bar) and rollouts (Parquet).

Files under ``<run_dir>``:

* ``metrics.jsonl`` -- one JSON object per step, ``{"step": 12, "reward/mean": 0.31, ...}``,
  flushed after every step. Values are plain ints/floats; NaN and +-inf are written as ``null``.
* ``tensorboard/`` -- the same scalars (``SummaryWriter``), when ``tensorboard=True``.
* ``rollouts/step_000012.parquet`` -- every completion of step 12 with its reward and tokens
  (:meth:`ray_rlhf.records.RolloutBatch.to_arrow`: :data:`~ray_rlhf.records.ROLLOUT_SCHEMA`, then
  one column per reward source and the dataset's own columns). One file per step, written to a temporary name and
  renamed, so a crash never leaves a half-written (footer-less, unreadable) file and a resumed
  run simply replaces the steps it redoes. Read them all with :func:`read_rollouts` or
  ``pyarrow.dataset.dataset(run_dir / "rollouts")``.

Resume: ``MetricsLogger(run_dir, resume_from_step=k)`` drops every line with ``step > k`` (and a
torn last line) before appending, and tells TensorBoard to purge events after ``k``;
``resume_from_step=None`` is a fresh run and starts ``metrics.jsonl`` empty.
``RolloutLogger(run_dir, resume_from_step=k)`` deletes step files after ``k``.

Keys produced by :func:`rollout_stats` from a :class:`~ray_rlhf.records.RolloutSummary` (the
driver adds ``ppo/*``, ``time/*``, ``sync/*``, ...):

===============================  =============================================================
key                              definition
===============================  =============================================================
``rollout/count``                completions in the step (prompts x samples per prompt)
``reward/mean``                  mean of the total (weighted) reward over completions
``reward/std``                   population standard deviation (ddof=0) of the total reward
``reward/min``, ``reward/max``   smallest and largest total reward
``reward_part/<source>``         mean unweighted score of one source; ``<source>`` is its
                                 ``module:function`` spec or ``model``
``response/length_mean``         mean response length in tokens (``len(response_ids)``, EOS
                                 included when sampled)
``response/length_max``          longest response, tokens
``response/finished_frac``       fraction of completions that ended on EOS
                                 (``finish_reason == "stop"``) rather than the length limit
``rollout/truncated_frac``       fraction of completions cut off at the length limit without
                                 EOS (``finish_reason == "length"``); 1 - ``finished_frac``
``rollout/version_lag_mean``     mean of ``learner_version - policy_version``: how many weight
                                 versions behind the learner each completion was sampled (0 =
                                 fully on-policy); only when ``learner_version`` is given
``rollout/version_lag_max``      largest such lag
``rollout/token_staleness_max``  ``rollout.partial``: largest ``learner_version -
                                 token_version`` over response tokens (never above
                                 ``rollout.max_staleness``)
``rollout/token_staleness_mean`` ``rollout.partial``: its mean over response tokens
``rollout/partial_frac``         ``rollout.partial``: fraction of completions interrupted by a
                                 weight load (tokens of more than one version)
===============================  =============================================================
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_rlhf.records import ROLLOUT_SCHEMA, RolloutBatch, RolloutSummary

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_DIR = "rollouts"
TENSORBOARD_DIR = "tensorboard"

DEFAULT_POSTFIX = {"reward": "reward/mean", "kl": "ppo/kl_ref", "s/step": "time/step"}
"""Progress-bar postfix label -> metrics key."""


def rollout_stats(summary: RolloutSummary, learner_version: int | None = None) -> dict[str, float]:
    """The rollout and reward keys of one step's metrics row (keys in the module docstring).

    ``learner_version``: the version the learner held when these rollouts were requested; the lag
    of a rollout is ``learner_version - policy_version``.
    """
    out: dict[str, float] = {
        "rollout/count": summary.count,
        "reward/mean": summary.reward_mean,
        "reward/std": summary.reward_std,
        "reward/min": summary.reward_min,
        "reward/max": summary.reward_max,
        "response/length_mean": summary.length_mean,
        "response/length_max": summary.length_max,
        "response/finished_frac": summary.finished_frac,
        "rollout/truncated_frac": summary.truncated_frac,
    }
    for name, value in summary.reward_parts.items():
        out[f"reward_part/{name}"] = value
    if learner_version is not None:
        out["rollout/version_lag_mean"] = learner_version - summary.version_mean
        out["rollout/version_lag_max"] = learner_version - summary.version_min
        if summary.token_version_min is not None:  # rollout.partial: versions per token
            out["rollout/token_staleness_max"] = learner_version - summary.token_version_min
            out["rollout/token_staleness_mean"] = learner_version - summary.token_version_mean
            out["rollout/partial_frac"] = summary.partial_frac
    return out


def _plain(key: str, value: Any) -> int | float | None:
    """A JSON-safe number: bool/int stay ints, floats (and NumPy/torch scalars) become floats,
    NaN/inf become None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    try:
        out = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from exc
    return out if math.isfinite(out) else None


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Rewrite ``path`` keeping lines with ``step <= keep_through_step``; drops torn lines."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= keep_through_step:
                kept.append(json.dumps(row) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsLogger:
    """Writes one metrics row per step to JSONL, TensorBoard and a tqdm progress bar.

    Args:
        run_dir: output directory (created).
        total_steps: length of the progress bar (None: open-ended).
        start_step: steps already done (the bar starts there).
        tensorboard: also write TensorBoard scalars to ``run_dir/tensorboard``.
        progress_bar: show a tqdm bar with ``postfix`` values.
        resume_from_step: resuming after this step: keep its metrics lines and drop later ones.
            None: a fresh run; an existing ``metrics.jsonl`` is emptied.
        postfix: progress-bar label -> metrics key (default: reward mean, KL, seconds per step).
    """

    def __init__(self, run_dir: str | Path, total_steps: int | None = None, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True, resume_from_step: int | None = None,
                 postfix: dict[str, str] | None = None, sinks: list | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_from_step is not None and self.path.exists():
            _truncate_jsonl(self.path, resume_from_step)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")
        self.postfix = dict(DEFAULT_POSTFIX if postfix is None else postfix)
        self.sinks = list(sinks or [])
        """More :class:`~ray_rlhf.telemetry.sinks.MetricSink` s (Ray metrics, W&B): every row goes to
        each of them too, and :meth:`gauge` / :meth:`increment` to the live ones."""
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_from_step + 1 if resume_from_step is not None else None
            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge)
        self._bar = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="ppo", unit="step", dynamic_ncols=True)

    def log(self, step: int, row: dict[str, Any], histograms: dict[str, Any] | None = None) -> dict[str, int | float | None]:
        """Append one step's metrics everywhere; returns the row as written to JSONL.

        ``histograms``: name -> array of values, written to TensorBoard only (e.g. the staleness of
        every sample of the step)."""
        if self._file is None:
            raise RuntimeError("MetricsLogger is closed")
        clean: dict[str, int | float | None] = {"step": int(step)}
        clean.update({k: _plain(k, v) for k, v in row.items() if k != "step"})
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if key != "step":
                    self._tb.add_scalar(key, math.nan if value is None else value, global_step=step)
            for key, values in (histograms or {}).items():
                if len(values):
                    self._tb.add_histogram(key, values, global_step=step)
            self._tb.flush()
        if self._bar is not None:
            shown = {label: clean[key] for label, key in self.postfix.items() if clean.get(key) is not None}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(1)
        row_only = {k: v for k, v in clean.items() if k != "step"}
        for sink in self.sinks:
            sink.write(int(step), row_only)
        return clean

    def gauge(self, name: str, value: float) -> None:
        """Set a live gauge (:data:`~ray_rlhf.telemetry.sinks.LIVE_GAUGES`) on the sinks that show them."""
        for sink in self.sinks:
            if hasattr(sink, "gauge"):
                sink.gauge(name, value)

    def increment(self, name: str, amount: float) -> None:
        """Add to a live counter (:data:`~ray_rlhf.telemetry.sinks.LIVE_COUNTERS`)."""
        for sink in self.sinks:
            if hasattr(sink, "increment") and amount > 0:
                sink.increment(name, amount)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rollout_file(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/rollouts/step_000123.parquet``."""
    return Path(run_dir) / ROLLOUTS_DIR / f"step_{step:06d}.parquet"


def _step_of(path: Path) -> int | None:
    stem = path.name.removesuffix(".parquet")
    if not stem.startswith("step_") or not stem[5:].isdigit():
        return None
    return int(stem[5:])


class RolloutLogger:
    """Appends each step's scored rollouts to ``<run_dir>/rollouts/step_NNNNNN.parquet``.

    ``resume_from_step=k`` deletes step files after ``k`` (a resumed run redoes those steps);
    None leaves existing files, each replaced when its step is written again.
    """

    def __init__(self, run_dir: str | Path, resume_from_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / ROLLOUTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_from_step is not None:
            for path in self.dir.glob("step_*.parquet"):
                step = _step_of(path)
                if step is not None and step > resume_from_step:
                    path.unlink()
        self._closed = False

    def write(self, step: int, batch: RolloutBatch) -> Path:
        """Write one step's scored batch (atomically); returns the file."""
        if self._closed:
            raise RuntimeError("RolloutLogger is closed")
        path = rollout_file(self.run_dir, step)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(batch.to_arrow(step), tmp)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        """Nothing stays open between steps; marks the logger closed. Safe to call twice."""
        self._closed = True

    def __enter__(self) -> RolloutLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rollouts(run_dir: str | Path) -> pa.Table:
    """Every logged rollout of a run, ordered by step (:data:`ROLLOUT_SCHEMA` columns first)."""
    files = sorted((p for p in (Path(run_dir) / ROLLOUTS_DIR).glob("step_*.parquet") if _step_of(p) is not None),
                   key=_step_of)
    if not files:
        return ROLLOUT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p) for p in files], promote_options="default")
