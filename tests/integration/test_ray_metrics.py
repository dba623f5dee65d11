"""RayMetricsSink end to end: a local Ray started the way the driver starts it (``include_dashboard=
False``), two steps and the live metrics written from the driver, then read back from the node's
Prometheus text endpoint (the dashboard agent's ``/metrics``) with the right values and labels.

Only ``_system_config={"metrics_report_interval_ms": 1000}`` is added, to see values after ~1 s
instead of Ray's default 10 s report interval; export itself needs nothing beyond ``ray[default]``.
Ray stops exporting a gauge series some time after its last ``set``: the test also checks that a
series the sink no longer sends (a ``None`` value) goes while the sink's keep-alive holds the others.
"""

from __future__ import annotations

import os
import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from ray_rlhf.telemetry.ray_metrics import RayMetricsSink, metrics_urls
from ray_rlhf.telemetry.sinks import (
    GENERATOR_UTILIZATION,
    POOL_SHARDS_QUEUED,
    POOL_SIZE,
    SYNC_BYTES,
    WEIGHT_VERSION,
)

pytestmark = pytest.mark.integration

RUN = f"it-{os.getpid()}"
SOURCE = "ray_rlhf.rewards.rules:letter_frequency"


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        pytest.skip("Ray already running in this process; this test must start Ray with its own report interval")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        yield
    finally:
        ray.shutdown()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, labels without Ray's own) -> value, for our run's ray_rlhf_* samples."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_rlhf_") and s.labels.get("run") == RUN:
                labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k in ("run", "source", "generator")))
                out[(s.name, labels)] = s.value
    return out


def test_step_rows_and_live_metrics_reach_prometheus(local_ray):
    url = metrics_urls()[ray.get_runtime_context().get_node_id()]
    sink = RayMetricsSink(RUN)
    sink.write(1, {"reward/mean": 0.25, "ppo/kl_ref": 0.5, "time/step": 2.0, f"reward_part/{SOURCE}": 0.5,
                   "pool/size": 2})
    sink.increment(SYNC_BYTES, 1000)
    sink.write(2, {"reward/mean": 0.75, "ppo/kl_ref": None, "time/step": 1.5, f"reward_part/{SOURCE}": 0.625,
                   "pool/size": 3})
    sink.increment(SYNC_BYTES, 2500)
    sink.gauge(POOL_SIZE, 3)
    sink.gauge(POOL_SHARDS_QUEUED, 4)
    sink.gauge(GENERATOR_UTILIZATION, 0.875)
    sink.gauge(WEIGHT_VERSION, 2)

    run = (("run", RUN),)
    want = {  # the last value of every gauge; the counter sums 1000 + 2500
        ("ray_rlhf_step", run): 2,
        ("ray_rlhf_reward_mean", run): 0.75,
        ("ray_rlhf_time_step", run): 1.5,
        ("ray_rlhf_pool_size", run): 3,
        ("ray_rlhf_reward_part", run + (("source", SOURCE),)): 0.625,
        ("ray_rlhf_live_pool_size", run): 3,
        ("ray_rlhf_live_pool_shards_queued", run): 4,
        ("ray_rlhf_live_generator_utilization", run): 0.875,
        ("ray_rlhf_live_weight_version", run): 2,
        ("ray_rlhf_live_sync_bytes_total", run): 3500,
    }
    def wait_for(done, timeout=60):
        t0, got = time.monotonic(), {}
        while time.monotonic() - t0 < timeout:
            got = scrape(url)
            if done(got):
                break
            time.sleep(0.5)
        return got, time.monotonic() - t0

    def all_there(got):
        return all(got.get(k) == v for k, v in want.items())

    got, seconds = wait_for(all_there)
    missing = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    assert not missing, f"after {seconds:.0f} s, (got, want): {missing}"
    print(f"metrics visible {seconds:.1f} s after writing, at {url}")

    # A series that is not set again expires (measured ~20 s here): step 1's kl_ref (step 2 sent None)
    # must go, while every other gauge, last set at the same moment, stays because the sink re-sets it.
    kl_ref = ("ray_rlhf_ppo_kl_ref", run)
    got, seconds = wait_for(lambda g: kl_ref not in g, timeout=45)
    assert kl_ref not in got, f"step 1's kl_ref still exported {seconds:.0f} s after step 2 sent None"
    assert all_there(got), f"gauges expired although the sink is open: {got}"
    print(f"stale series gone after {seconds:.1f} s; the re-set ones stayed")
    sink.close()


def test_a_run_exports_its_step_metrics_and_pool_gauges(local_ray, tmp_path, tiny_policy_path):
    """Two steps of a real run (tiny preset): while its actors are still up, the node's Prometheus
    endpoint shows the last step's metrics and the live pool gauges, equal to metrics.jsonl's."""
    import json

    from ray_rlhf.config import load_config
    from ray_rlhf.run.driver import run

    url = metrics_urls()[ray.get_runtime_context().get_node_id()]
    name = f"run-{os.getpid()}"
    cfg = load_config("tiny", [f"name={name}", f"output_dir={tmp_path}", f"model.cache_dir={tiny_policy_path.parent}",
                               "steps=2", "rollout.prompts_per_step=4", "ppo.minibatch_size=16",
                               "ppo.micro_batch_size=16", "logging.progress_bar=false", "checkpoint.every=0"])
    seen: dict = {}

    def read_endpoint(actors):
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = {k[0]: v for k, v in scrape_run(url, name).items()}
            if got.get("ray_rlhf_step") == 2 and "ray_rlhf_live_pool_size" in got:
                break
            time.sleep(0.5)
        seen.update(got=got, last=last)

    run(cfg, on_finish=read_endpoint)
    got, last = seen["got"], seen["last"]
    assert got["ray_rlhf_step"] == 2
    assert got["ray_rlhf_reward_mean"] == pytest.approx(last["reward/mean"])
    assert got["ray_rlhf_ppo_kl_ref"] == pytest.approx(last["ppo/kl_ref"])
    assert got["ray_rlhf_pool_size"] == last["pool/size"] == 2
    assert got["ray_rlhf_live_pool_size"] == 2 and got["ray_rlhf_live_weight_version"] == 2
    assert got["ray_rlhf_live_pool_shards_queued"] == 0
    assert got["ray_rlhf_live_sync_bytes_total"] == pytest.approx(2 * last["sync/bytes"])


def scrape_run(url: str, run: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_rlhf_") and s.labels.get("run") == run and "source" not in s.labels:
                out[(s.name, ())] = s.value
    return out
