"""Where per-step metrics go besides ``metrics.jsonl``: the :class:`MetricSink` protocol, Prometheus
through Ray's metrics (:class:`RayMetricsSink`) and Weights & Biases (:class:`WandbSink`).

The naming rules of every sink are in :mod:`ray_rlhf.telemetry.sinks`; the Grafana dashboard
for the Prometheus series is ``clusters/grafana/ray-rlhf-dashboard.json``.
"""

from ray_rlhf.telemetry.ray_metrics import DASHBOARD_KEYS, RayMetricsSink, metrics_urls, prometheus_name
from ray_rlhf.telemetry.sinks import (
    GENERATOR_UTILIZATION,
    LIVE_COUNTERS,
    LIVE_GAUGES,
    POOL_SHARDS_QUEUED,
    POOL_SIZE,
    SYNC_BYTES,
    WEIGHT_VERSION,
    LiveMetricSink,
    MetricSink,
    Row,
)
from ray_rlhf.telemetry.wandb_sink import WandbSink

__all__ = [
    "DASHBOARD_KEYS", "GENERATOR_UTILIZATION", "LIVE_COUNTERS", "LIVE_GAUGES", "POOL_SHARDS_QUEUED", "POOL_SIZE",
    "SYNC_BYTES", "WEIGHT_VERSION", "LiveMetricSink", "MetricSink", "RayMetricsSink", "Row", "WandbSink",
    "metrics_urls", "prometheus_name",
]
