"""Per-step metrics and live gauges to Prometheus through Ray's metrics (``ray.util.metrics``).

How values reach Prometheus (checked with Ray 2.60, ``ray[default]``, on a local Ray):

* Every Ray node runs a *dashboard agent* (started by the raylet, also with
  ``include_dashboard=False``: that flag only drops the dashboard head's modules and web UI). The
  agent serves all metrics of its node as Prometheus text at ``http://<node ip>:<port>/metrics``.
  It is absent only in a minimal ``ray`` install (without ``[default]``).
* The port is ``ray start --metrics-export-port=N`` / ``ray.init(_metrics_export_port=N)``;
  unset, each node picks a free port. Find it from a driver with :func:`metrics_urls` (the node
  table's ``MetricsExportPort``).
* A process sends its metrics to the agent on its own node every ``metrics_report_interval_ms``
  (default 10 s, at least 1 s; a Ray system config: ``ray.init(_system_config=
  {"metrics_report_interval_ms": 1000})`` or ``RAY_metrics_report_interval_ms``). A value set now
  appears within about one interval.
* **A gauge that is not set again disappears** (Ray evicts gauge series that stop being reported,
  so dead workers' series vanish; measured here: gone ~20 s after a single ``set`` with a 1 s
  interval, 25-30 s with the default 10 s). Counters stay. A PPO step takes longer than that, so
  this sink re-sets every gauge series from a background thread every half interval, until
  :meth:`RayMetricsSink.close`.
* Non-finite values are dropped by the exporter (with a warning in the agent's log per scrape), so
  a ``None`` (NaN/inf) value is not sent: the series stops being re-set and disappears, rather
  than showing a stale number.
* Ray prefixes every name with ``ray_`` and adds the labels ``Component``, ``NodeAddress``,
  ``SessionName``, ``Version`` and ``WorkerId``; aggregate them away in queries
  (``max by (run) (...)``), as the Grafana dashboard does.

Naming (also in :mod:`ray_rlhf.telemetry.sinks`): key ``reward/mean`` -> ``ray_rlhf_reward_mean``;
every character outside ``[A-Za-z0-9_]`` becomes ``_``; ``reward_part/<source>`` ->
``ray_rlhf_reward_part{source="<source>"}``; ``step`` -> ``ray_rlhf_step``; live gauge ``pool_size``
-> ``ray_rlhf_live_pool_size``; live counter ``sync_bytes`` -> ``ray_rlhf_live_sync_bytes_total``.
Every series has the label ``run`` (the run name), so several runs can share one cluster and one
Prometheus.

A gauge keeps its last value while the sink is open: a key missing from a later row still shows
its old value (``ray_rlhf_step`` tells which step is current).
"""

from __future__ import annotations

import math
import re
import threading
import warnings

import ray
from ray.util.metrics import Counter, Gauge

from ray_rlhf.telemetry.sinks import LIVE_COUNTERS, LIVE_GAUGES, Row

RAY_PREFIX = "ray_"
"""Added by Ray to every application metric name."""
NAME_PREFIX = "rlhf_"
"""Our prefix: Prometheus shows ``ray_rlhf_...``."""
LIVE_PREFIX = "live_"
"""Live metrics live apart from per-step keys (``pool/size`` and live ``pool_size`` would clash)."""
RUN_TAG = "run"
LABELLED_FAMILIES: dict[str, str] = {"reward_part/": "source"}
"""Key prefix -> label: every key under the prefix is one metric with the rest of the key as label."""

_ILLEGAL = re.compile(r"[^A-Za-z0-9_]")

DASHBOARD_KEYS: tuple[str, ...] = (
    "step",
    "reward/mean",
    "reward/std",
    "reward_part/<source>",
    "ppo/kl_ref",
    "time/step",
    "time/generate",
    "time/reward",
    "time/learn",
    "time/sync",
    "time/log",
    "time/orchestration",
    "perf/generated_tokens_per_s",
    "sync/seconds",
    "pool/size",
)
"""Per-step keys (``docs/metrics.md``) shown by ``clusters/grafana/ray-rlhf-dashboard.json``,
besides every live metric of :data:`~ray_rlhf.telemetry.sinks.LIVE_GAUGES` / ``LIVE_COUNTERS``."""


def _split(key: str) -> tuple[str, str, dict[str, str]]:
    """(family, Ray metric name, extra labels): the family is the key, or its labelled prefix."""
    for prefix, label in LABELLED_FAMILIES.items():
        if key.startswith(prefix):
            return prefix, NAME_PREFIX + _ILLEGAL.sub("_", prefix.rstrip("/")), {label: key[len(prefix):]}
    return key, NAME_PREFIX + _ILLEGAL.sub("_", key), {}


def ray_metric(key: str) -> tuple[str, dict[str, str]]:
    """The ``ray.util.metrics`` name of metric key ``key`` and its extra labels.

    ``"reward/mean"`` -> ``("rlhf_reward_mean", {})``;
    ``"reward_part/a.b:c"`` -> ``("rlhf_reward_part", {"source": "a.b:c"})``.
    """
    _, name, tags = _split(key)
    return name, tags


def prometheus_name(key: str) -> str:
    """The name Prometheus shows for metric key ``key`` (``reward/mean`` -> ``ray_rlhf_reward_mean``)."""
    return RAY_PREFIX + ray_metric(key)[0]


def live_prometheus_name(name: str) -> str:
    """Prometheus name of a live gauge or counter (counters get Prometheus' ``_total``)."""
    if name in LIVE_GAUGES:
        return RAY_PREFIX + NAME_PREFIX + LIVE_PREFIX + name
    if name in LIVE_COUNTERS:
        return RAY_PREFIX + NAME_PREFIX + LIVE_PREFIX + name + "_total"
    raise ValueError(f"unknown live metric {name!r} (known: {', '.join([*LIVE_GAUGES, *LIVE_COUNTERS])})")


def metrics_urls() -> dict[str, str]:
    """Node id -> ``http://<ip>:<port>/metrics`` of every alive node whose agent exports metrics.

    A driver's own metrics are served by its node: ``metrics_urls()[ray.get_runtime_context().get_node_id()]``.
    """
    return {n["NodeID"]: f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n["Alive"] and n.get("MetricsExportPort", 0) > 0}


def _number(key: str, value: float | int | None) -> float | None:
    """A finite float, or None for None/NaN/inf (not sent: the exporter drops non-finite values)."""
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from exc
    return out if math.isfinite(out) else None


def report_interval_s() -> float:
    """Seconds between two reports of a process's metrics to its node's agent (Ray floors it at 1 s)."""
    return max(ray._config.metrics_report_interval_ms(), 1000) / 1000


class RayMetricsSink:
    """Exports every per-step row and the live metrics through ``ray.util.metrics``.

    Implements :class:`~ray_rlhf.telemetry.sinks.LiveMetricSink`. Build it in the driver after
    ``ray.init``; one Ray metric is created per name on first use. A daemon thread re-sets every
    gauge series to its last value every ``refresh_s`` so it stays visible (see the module
    docstring); :meth:`close` stops it and the gauges disappear some 20-30 s later.

    Args:
        run: value of the ``run`` label on every series (the run name).
        refresh_s: period of the re-set; default half of Ray's report interval (5 s by default).
    """

    def __init__(self, run: str, refresh_s: float | None = None):
        if not ray.is_initialized():
            raise RuntimeError("RayMetricsSink needs a connected Ray: call ray.init() first")
        self.run = str(run)
        self.refresh_s = refresh_s if refresh_s is not None else report_interval_s() / 2
        self._metrics: dict[str, Gauge | Counter] = {}
        self._tag_keys: dict[str, tuple[str, ...]] = {}
        # Ray metric name -> the key (or labelled prefix) that claimed it; step and live names are reserved.
        self._owner: dict[str, str] = {NAME_PREFIX + "step": "step"}
        self._owner.update({NAME_PREFIX + LIVE_PREFIX + n: f"live metric {n}" for n in [*LIVE_GAUGES, *LIVE_COUNTERS]})
        self._skipped: set[str] = set()  # keys not exported because their name was taken (warned once)
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # (gauge, extra labels) -> value
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_alive, name="ray-rlhf-metrics-keepalive", daemon=True)
        self._thread.start()

    def _metric(self, name: str, kind: type[Gauge] | type[Counter], description: str,
                tags: dict[str, str]) -> Gauge | Counter:
        keys = (RUN_TAG, *sorted(tags))
        metric = self._metrics.get(name)
        if metric is None:
            metric = kind(name, description=description, tag_keys=keys).set_default_tags({RUN_TAG: self.run})
            self._metrics[name], self._tag_keys[name] = metric, keys
        elif self._tag_keys[name] != keys:
            raise ValueError(f"metric {name!r} was first recorded with labels {self._tag_keys[name]}, now {keys}")
        return metric

    def _set(self, name: str, description: str, tags: dict[str, str], key: str, value: float | int | None) -> None:
        """Set a gauge series now and remember it for the keep-alive; None forgets the series."""
        number = _number(key, value)
        gauge = self._metric(name, Gauge, description, tags)
        series = (name, tuple(sorted(tags.items())))
        if number is None:
            self._last.pop(series, None)
            return
        self._last[series] = number
        gauge.set(number, tags=tags or None)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                for (name, tags), number in self._last.items():
                    self._metrics[name].set(number, tags=dict(tags) or None)

    def write(self, step: int, row: Row) -> None:
        """Set one gauge per key (and ``ray_rlhf_step``) to this step's values."""
        if self._stop.is_set():
            raise RuntimeError("RayMetricsSink is closed")
        with self._lock:
            self._set(NAME_PREFIX + "step", "last PPO step written", {}, "step", int(step))
            for key, value in row.items():
                if key == "step":
                    continue
                family, name, tags = _split(key)
                if self._owner.setdefault(name, family) != family:
                    if key not in self._skipped:
                        self._skipped.add(key)
                        warnings.warn(f"metric key {key!r} maps to the Prometheus name {RAY_PREFIX + name!r}, "
                                      f"already used by {self._owner[name]!r}; {key!r} is not exported", stacklevel=2)
                    continue
                self._set(name, f"ray-rlhf metric {family!r} (docs/metrics.md)", tags, key, value)

    def gauge(self, name: str, value: float | int, tags: dict[str, str] | None = None) -> None:
        """Set live gauge ``name`` (:data:`~ray_rlhf.telemetry.sinks.LIVE_GAUGES`)."""
        if name not in LIVE_GAUGES:
            raise ValueError(f"unknown live gauge {name!r} (known: {', '.join(LIVE_GAUGES)})")
        with self._lock:
            self._set(NAME_PREFIX + LIVE_PREFIX + name, LIVE_GAUGES[name], dict(tags or {}), name, value)

    def increment(self, name: str, amount: float | int, tags: dict[str, str] | None = None) -> None:
        """Add ``amount`` (> 0) to live counter ``name`` (:data:`~ray_rlhf.telemetry.sinks.LIVE_COUNTERS`)."""
        if name not in LIVE_COUNTERS:
            raise ValueError(f"unknown live counter {name!r} (known: {', '.join(LIVE_COUNTERS)})")
        number = _number(name, amount)
        if number is None or number <= 0:
            raise ValueError(f"live counter {name!r} needs a finite amount > 0, got {amount!r}")
        tags = dict(tags or {})
        with self._lock:
            counter = self._metric(NAME_PREFIX + LIVE_PREFIX + name, Counter, LIVE_COUNTERS[name], tags)
            counter.inc(number, tags=tags or None)

    def close(self) -> None:
        """Stop the keep-alive; the gauges disappear from Prometheus some 20-30 s later (counters
        stay while the process lives). Safe to call twice."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> RayMetricsSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
