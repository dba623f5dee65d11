"""The seam between the driver's metrics and the places they go: :class:`MetricSink`.

A sink receives one **row** per PPO step -- ``write(step, row)`` -- and is closed once at the end.
The row is what the driver's :class:`~ray_rlhf.metrics.MetricsLogger` writes to ``metrics.jsonl``,
already cleaned: keys are the metric keys of ``docs/metrics.md`` (``reward/mean``, ``time/step``,
``reward_part/<source>``, ...), values are plain ``int``/``float``, and NaN/+-inf arrive as
``None``. ``step`` is the argument, never a key of the row. Every sink applies its own naming
rules to the same keys; no sink renames keys for the others.

Sinks that can also show *live* values -- numbers that change between steps, such as the size of
the generator pool while a rollout runs -- implement :class:`LiveMetricSink` as well. The live
names are fixed here (:data:`LIVE_GAUGES`, :data:`LIVE_COUNTERS`); a sink rejects other names, so a
typo fails at once instead of silently creating a new series.

How one key is named by each sink
=================================

Examples: ``reward/mean`` and ``reward_part/ray_rlhf.rewards.rules:letter_frequency`` (``R`` below).

* **JSONL** (``metrics.jsonl``): key verbatim as the JSON key; ``None`` is ``null``.
* **TensorBoard**: tag = key verbatim (``SummaryWriter`` keeps every character, ``.`` and ``:``
  included); the part before the first ``/`` is the section (``reward``, ``reward_part``);
  ``None`` is written as NaN.
* **Progress bar**: only the keys named in its postfix map, under a short label
  (``reward`` -> ``reward/mean``); ``R`` is not shown unless mapped.
* **Prometheus** (:class:`~ray_rlhf.telemetry.ray_metrics.RayMetricsSink`): Ray prefixes every
  application metric with ``ray_``, so the sink registers ``rlhf_<key>`` and Prometheus shows
  ``ray_rlhf_<key>`` with every character outside ``[A-Za-z0-9_]`` (``/ . : -``) replaced by
  ``_``: ``reward/mean`` -> ``ray_rlhf_reward_mean``. ``reward_part/<source>`` is one metric with
  the source as a label (a source is user code: a label value, never part of a name):
  ``R`` -> ``ray_rlhf_reward_part{source="ray_rlhf.rewards.rules:letter_frequency"}``. ``step`` is
  ``ray_rlhf_step``; live gauges are ``ray_rlhf_live_<name>``, live counters
  ``ray_rlhf_live_<name>_total``. Every series has the label ``run="<run name>"``. ``None`` is not
  sent (the series stops and expires instead of showing a stale value).
* **Weights & Biases** (:class:`~ray_rlhf.telemetry.wandb_sink.WandbSink`): key verbatim, logged at
  W&B step ``step``; the part before the first ``/`` is the panel section; ``.`` and ``:`` are
  kept; ``None`` values are left out of the row.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

Row = dict[str, float | int | None]
"""One step's metrics: metric key (``docs/metrics.md``) -> plain number, ``None`` for NaN/inf."""


@runtime_checkable
class MetricSink(Protocol):
    """Receives one row of per-step scalar metrics per PPO step."""

    def write(self, step: int, row: Row) -> None:
        """Record the metrics of ``step`` (1-based). Steps arrive in increasing order; after a
        resume from step ``k`` the next step is ``k + 1`` again, which a sink may have seen before."""
        ...

    def close(self) -> None:
        """Flush and release everything; safe to call twice. No ``write`` after ``close``."""
        ...


# Names of the live metrics (the driver passes these constants, never a literal).
POOL_SIZE = "pool_size"
POOL_SHARDS_QUEUED = "pool_shards_queued"
GENERATOR_UTILIZATION = "generator_utilization"
WEIGHT_VERSION = "weight_version"
SYNC_BYTES = "sync_bytes"

LIVE_GAUGES: dict[str, str] = {
    POOL_SIZE: "live generator actors in the pool, set whenever the pool grows or shrinks",
    POOL_SHARDS_QUEUED: "rollout shards of the current step waiting for a free generator (0 between rollouts)",
    GENERATOR_UTILIZATION: "busy fraction of the generators over the last rollout phase: the sum of the "
                           "generators' generate time / (pool size x rollout wall time), in [0, 1]",
    WEIGHT_VERSION: "policy version the generators hold (the version of the last completed weight broadcast)",
}
"""Live gauges (last value wins): name -> definition. Set between steps by the driver."""

LIVE_COUNTERS: dict[str, str] = {
    SYNC_BYTES: "bytes of weights broadcast by this driver process (one copy per sync, as ``sync/bytes``); "
                "monotonic, restarts at 0 with the driver, so read it with rate()",
}
"""Live counters (only ever increase): name -> definition."""


@runtime_checkable
class LiveMetricSink(MetricSink, Protocol):
    """A sink that also shows values the driver sets between steps (e.g. Prometheus via Ray)."""

    def gauge(self, name: str, value: float | int, tags: dict[str, str] | None = None) -> None:
        """Set live gauge ``name`` (a key of :data:`LIVE_GAUGES`) to ``value``. ``tags`` add labels
        (e.g. ``{"generator": "3"}``); a gauge keeps the label keys of its first call."""
        ...

    def increment(self, name: str, amount: float | int, tags: dict[str, str] | None = None) -> None:
        """Add ``amount`` (> 0) to live counter ``name`` (a key of :data:`LIVE_COUNTERS`)."""
        ...
