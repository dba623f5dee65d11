"""Telemetry sinks without a Ray cluster: Prometheus naming, RayMetricsSink's bookkeeping (with fake
Ray metrics), the Grafana dashboard against the names the sink exports, and the W&B sink in
offline mode (read back from the run's ``.wandb`` file)."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import time
from pathlib import Path

import pytest

from ray_rlhf.errors import UserError
from ray_rlhf.telemetry import ray_metrics
from ray_rlhf.telemetry.ray_metrics import (
    DASHBOARD_KEYS,
    RayMetricsSink,
    live_prometheus_name,
    prometheus_name,
    ray_metric,
)
from ray_rlhf.telemetry.sinks import (
    GENERATOR_UTILIZATION,
    LIVE_COUNTERS,
    LIVE_GAUGES,
    POOL_SIZE,
    SYNC_BYTES,
    LiveMetricSink,
    MetricSink,
)
from ray_rlhf.telemetry.wandb_sink import WandbSink

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "clusters" / "grafana" / "ray-rlhf-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # Prometheus' rule, without ':' (Ray deprecates it)
RULE_SOURCE = "ray_rlhf.rewards.rules:letter_frequency"


def documented_keys() -> list[str]:
    """Every key in the first column of docs/metrics.md's tables (``reward_part/<source>`` as is)."""
    keys = []
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "`" in cells[1]:
            keys += re.findall(r"`([^`]+)`", cells[1])
    return keys


# ------------------------------------------------------------------------------ naming


def test_names_by_hand():
    assert ray_metric("reward/mean") == ("rlhf_reward_mean", {})
    assert prometheus_name("reward/mean") == "ray_rlhf_reward_mean"  # Ray adds "ray_"
    assert prometheus_name("perf/generated_tokens_per_s") == "ray_rlhf_perf_generated_tokens_per_s"
    assert prometheus_name("step") == "ray_rlhf_step"
    # '.', ':' and '-' are not legal in a (colon-free) Prometheus name: each becomes '_'.
    assert prometheus_name("x/a.b:c-d") == "ray_rlhf_x_a_b_c_d"
    # A reward source is user code: a label value, one metric for all sources.
    assert ray_metric(f"reward_part/{RULE_SOURCE}") == ("rlhf_reward_part", {"source": RULE_SOURCE})
    assert prometheus_name(f"reward_part/{RULE_SOURCE}") == "ray_rlhf_reward_part"
    assert live_prometheus_name(POOL_SIZE) == "ray_rlhf_live_pool_size"
    assert live_prometheus_name(SYNC_BYTES) == "ray_rlhf_live_sync_bytes_total"  # counters: Prometheus' _total
    with pytest.raises(ValueError, match="unknown live metric 'pool'"):
        live_prometheus_name("pool")


def test_every_documented_key_has_a_legal_distinct_name():
    keys = documented_keys()
    assert {"reward/mean", "ppo/kl_ref", "time/step", "reward_part/<source>", "step"} <= set(keys)
    names: dict[str, str] = {}
    for key in keys:
        name = prometheus_name(key)
        assert PROMETHEUS_NAME.match(name), (key, name)
        assert names.setdefault(name, key) == key, f"{key!r} and {names[name]!r} both export as {name}"
    live = [live_prometheus_name(n) for n in [*LIVE_GAUGES, *LIVE_COUNTERS]]
    assert not set(live) & set(names), "a live metric shares a name with a per-step key"
    assert all(PROMETHEUS_NAME.match(n) for n in live)


# ------------------------------------------------------------------------------ RayMetricsSink with fake Ray metrics


class FakeMetric:
    """Stands in for ray.util.metrics.Gauge/Counter: checks tags like Ray does, keeps values by label set."""

    created: dict[str, FakeMetric] = {}

    def __init__(self, name, description="", tag_keys=()):
        assert PROMETHEUS_NAME.match(name), name
        assert name not in FakeMetric.created, f"{name} created twice"
        self.name, self.description, self.tag_keys, self.default = name, description, tag_keys, {}
        self.values: dict[tuple, float] = {}
        self.sets: dict[tuple, int] = {}  # how often each series was set (the keep-alive re-sets)
        FakeMetric.created[name] = self

    def set_default_tags(self, tags):
        assert set(tags) <= set(self.tag_keys)
        self.default = tags
        return self

    def _labels(self, tags):
        final = {**self.default, **(tags or {})}
        assert set(final) == set(self.tag_keys), (self.name, final, self.tag_keys)
        assert all(isinstance(v, str) for v in final.values())
        return tuple(sorted(final.items()))

    def set(self, value, tags=None):
        assert isinstance(value, (int, float)) and math.isfinite(value)
        key = self._labels(tags)
        self.values[key] = value
        self.sets[key] = self.sets.get(key, 0) + 1

    def inc(self, value, tags=None):
        assert value > 0
        key = self._labels(tags)
        self.values[key] = self.values.get(key, 0) + value


@pytest.fixture
def fake_ray(monkeypatch):
    FakeMetric.created = {}
    monkeypatch.setattr(ray_metrics, "Gauge", FakeMetric)
    monkeypatch.setattr(ray_metrics, "Counter", FakeMetric)
    monkeypatch.setattr(ray_metrics.ray, "is_initialized", lambda: True)
    return FakeMetric.created


def value(created, name, **labels):
    return created[name].values[tuple(sorted(labels.items()))]


def sets(created, name, **labels):
    return created[name].sets.get(tuple(sorted(labels.items())), 0)


def test_ray_sink_needs_ray_init(monkeypatch):
    monkeypatch.setattr(ray_metrics.ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="ray.init"):
        RayMetricsSink("r")


def test_ray_sink_rows_and_live_metrics(fake_ray):
    sink = RayMetricsSink("run-a", refresh_s=3600)  # no keep-alive tick during this test
    assert isinstance(sink, LiveMetricSink) and isinstance(sink, MetricSink)
    assert fake_ray == {}  # lazy: nothing before the first value
    sink.write(1, {"reward/mean": 0.5, "pool/size": 2, f"reward_part/{RULE_SOURCE}": 0.25, "ppo/kl_ref": 0.125})
    sink.write(2, {"reward/mean": 0.75, "pool/size": 3, f"reward_part/{RULE_SOURCE}": 1.0, "reward_part/model": -1,
                   "ppo/kl_ref": None, "step": 99})
    assert value(fake_ray, "rlhf_step", run="run-a") == 2  # the argument, not the row's "step"
    assert value(fake_ray, "rlhf_reward_mean", run="run-a") == 0.75  # gauges: last value wins
    assert value(fake_ray, "rlhf_pool_size", run="run-a") == 3.0
    assert value(fake_ray, "rlhf_reward_part", run="run-a", source=RULE_SOURCE) == 1.0
    assert value(fake_ray, "rlhf_reward_part", run="run-a", source="model") == -1.0
    assert sets(fake_ray, "rlhf_ppo_kl_ref", run="run-a") == 1  # None is not sent (never NaN)
    assert fake_ray["rlhf_reward_part"].tag_keys == ("run", "source")

    sink.gauge(POOL_SIZE, 4)
    sink.gauge(GENERATOR_UTILIZATION, 0.5)
    sink.increment(SYNC_BYTES, 1000)
    sink.increment(SYNC_BYTES, 24)
    assert value(fake_ray, "rlhf_live_pool_size", run="run-a") == 4.0
    assert value(fake_ray, "rlhf_live_generator_utilization", run="run-a") == 0.5
    assert value(fake_ray, "rlhf_live_sync_bytes", run="run-a") == 1024.0  # 1000 + 24
    assert value(fake_ray, "rlhf_pool_size", run="run-a") == 3.0  # per-step pool/size is a separate series

    with pytest.raises(ValueError, match="unknown live gauge 'pool/size'"):
        sink.gauge("pool/size", 1)
    with pytest.raises(ValueError, match="unknown live counter 'pool_size'"):
        sink.increment(POOL_SIZE, 1)
    with pytest.raises(ValueError, match="amount > 0"):
        sink.increment(SYNC_BYTES, 0)
    with pytest.raises(ValueError, match="labels"):  # label keys are fixed by the first call
        sink.gauge(POOL_SIZE, 1, tags={"zone": "a"})
    with pytest.raises(TypeError, match="'x/y' must be a number"):
        sink.write(3, {"x/y": "high"})
    sink.close()
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(4, {})


def test_ray_sink_keep_alive_resets_last_values_until_close(fake_ray):
    # Ray drops a gauge series ~2 report intervals after its last set: the sink re-sets each one.
    sink = RayMetricsSink("r", refresh_s=0.01)
    sink.write(1, {"reward/mean": 0.5, "ppo/kl_ref": 0.25})
    sink.write(2, {"reward/mean": 0.75, "ppo/kl_ref": None})  # NaN/inf: stop sending, let it expire
    sink.gauge(POOL_SIZE, 3)
    deadline = time.monotonic() + 10
    while sets(fake_ray, "rlhf_reward_mean", run="r") < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.close()
    n_mean, n_pool = sets(fake_ray, "rlhf_reward_mean", run="r"), sets(fake_ray, "rlhf_live_pool_size", run="r")
    assert n_mean >= 5 and n_pool >= 3
    assert value(fake_ray, "rlhf_reward_mean", run="r") == 0.75  # re-set to the last value
    assert sets(fake_ray, "rlhf_ppo_kl_ref", run="r") == 1  # only step 1's set, never re-sent
    time.sleep(0.05)
    assert sets(fake_ray, "rlhf_reward_mean", run="r") == n_mean  # closed: no more re-sets


def test_ray_sink_name_collision_warns_once_and_keeps_the_first(fake_ray):
    sink = RayMetricsSink("r", refresh_s=3600)
    taken = "'perf_x' maps to the Prometheus name 'ray_rlhf_perf_x', already used by 'perf/x'"
    with pytest.warns(UserWarning, match=taken):
        sink.write(1, {"perf/x": 1.0, "perf_x": 2.0})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.write(2, {"perf/x": 3.0, "perf_x": 4.0})  # no second warning
    assert value(fake_ray, "rlhf_perf_x", run="r") == 3.0
    with pytest.warns(UserWarning, match="live metric pool_size"):
        sink.write(3, {"live/pool_size": 1.0})  # live names are reserved
    sink.close()


# ------------------------------------------------------------------------------ Grafana dashboard


def exported_names() -> set[str]:
    live = [*LIVE_GAUGES, *LIVE_COUNTERS]
    return {prometheus_name(k) for k in DASHBOARD_KEYS} | {live_prometheus_name(n) for n in live}


def test_dashboard_keys_are_documented():
    assert set(DASHBOARD_KEYS) <= set(documented_keys())


def test_dashboard_queries_only_exported_metrics_filtered_by_run():
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["query"]["query"] == "label_values(ray_rlhf_step, run)"
    assert variables["run"]["multi"] and variables["run"]["includeAll"]
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = set(re.findall(r"\bray_rlhf_[A-Za-z0-9_]+", t["expr"]))
            assert names, (p["title"], t["expr"])
            assert names <= exported_names(), (p["title"], names - exported_names())
            assert t["expr"].count('run=~"$run"') == len(re.findall(r"\bray_rlhf_\w+\{", t["expr"])), t["expr"]
            used |= names
    assert used == exported_names(), f"DASHBOARD_KEYS not on any panel: {exported_names() - used}"
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("reward mean", "kl to reference", "step time", "time per phase", "tokens/s", "pool size",
                 "utilisation", "weight version", "sync seconds"):
        assert word in titles, word


# ------------------------------------------------------------------------------ Weights & Biases


def read_offline_run(run_dir: Path) -> tuple[list[dict], dict]:
    """History rows and final summary of an offline W&B run, from its ``run-<id>.wandb`` file.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
    of chunks, each ``crc32 (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)``
    followed by part of a serialized ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, payloads = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind in (2, 3):
            parts = (parts if kind == 3 else b"") + chunk
        elif kind == 4:
            payloads.append(parts + chunk)
    history, summary = [], {}
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        if record.HasField("history"):
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif record.HasField("summary"):
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in record.summary.update})
    return history, summary


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline, writing only under tmp_path (never the user's home or credentials)."""
    for var, sub in [("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data"), ("HOME", "home")]:
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_wandb_offline_run_holds_the_rows(wandb_env):
    pytest.importorskip("wandb")
    rows = {1: {"reward/mean": 0.25, "ppo/kl_ref": 0.5, f"reward_part/{RULE_SOURCE}": 1.0},
            2: {"reward/mean": 0.75, "ppo/kl_ref": None, f"reward_part/{RULE_SOURCE}": 0.5},
            3: {"reward/mean": 1.25, "ppo/kl_ref": 0.125, f"reward_part/{RULE_SOURCE}": 0.0, "pool/size": 2}}
    sink = WandbSink(project="ray-rlhf-test", name="tiny", mode="offline", dir=wandb_env / "out",
                     config={"ppo": {"clip_eps": 0.2}})
    assert isinstance(sink, MetricSink)
    for step, row in rows.items():
        sink.write(step, row)
    sink.close()
    sink.close()  # idempotent
    assert sink.run_dir.parent == wandb_env / "out" / "wandb" and sink.run_dir.name.startswith("offline-run-")
    deadline = time.monotonic() + 30  # once (a fresh-clone CI) the file read back empty right after finish()
    while True:
        history, summary = read_offline_run(sink.run_dir)
        if (len(history) == len(rows) and "_step" in summary) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    got = {h["_step"]: {k: v for k, v in h.items() if not k.startswith("_")} for h in history}
    # None is left out of the W&B row (step 2 has no kl_ref); '.' and ':' in keys are kept.
    assert got == {s: {k: v for k, v in r.items() if v is not None} for s, r in rows.items()}
    assert summary["reward/mean"] == 1.25 and summary["ppo/kl_ref"] == 0.125 and summary["pool/size"] == 2
    assert summary[f"reward_part/{RULE_SOURCE}"] == 0.0 and summary["_step"] == 3
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(4, {"reward/mean": 0.0})


def test_wandb_disabled_needs_no_package_and_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    sink = WandbSink(project="p", mode="disabled")
    sink.write(1, {"reward/mean": 1.0})
    sink.close()
    with pytest.raises(UserError, match="pip install wandb") as e:
        WandbSink(project="p", mode="offline")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="mode must be one of online, offline, disabled, got 'offlne'"):
        WandbSink(project="p", mode="offlne")


@pytest.mark.timeout(60)
def test_wandb_online_without_login_is_a_user_error(wandb_env):
    pytest.importorskip("wandb")
    with pytest.raises(UserError, match="wandb login"):
        WandbSink(project="p", mode="online")
