"""The generator pool grows and shrinks with a (simulated) multi-node Ray cluster.

``ray.cluster_utils.Cluster`` starts real raylets on this machine: a head node with room for the
learner and the reward actor only, and worker nodes with room for exactly one generator each
(``generators.num_cpus=1``, one CPU per worker node). The run starts with one generator
(``generators.min=1``, ``max=2``):

* after step 1 a worker node joins: the pool grows to 2 before step 2, the new actor (``gen-1``)
  is synced to version 1 first, passes verify, and serves step 2 at version 1;
* after step 2 that node is removed: ``gen-1`` is found dead at step 3's dispatch, its shard is
  re-queued, there is no room for a replacement, so the pool carries on with 1 generator and the
  run completes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from ray_rlhf.config import load_config
from ray_rlhf.metrics import read_rollouts
from ray_rlhf.run.driver import run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PROMPTS, SAMPLES, STEPS = 8, 2, 3


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1,  # learner 0.5 + reward 0.25: no room for a 1-CPU generator
        "include_dashboard": False,
        # Pack actors onto the driver's node until it is full (Ray spreads past 50% by default), so
        # the learner and reward actor stay on the head and each worker node keeps its one CPU.
        "_system_config": {"scheduler_spread_threshold": 1.0,
                           "health_check_period_ms": 1000, "health_check_failure_threshold": 5},
    })
    c.add_node(num_cpus=1)  # room for the first generator
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def test_pool_grows_and_shrinks_with_the_cluster(tmp_path, tiny_policy_path, cluster):
    seen: dict[int, dict] = {}
    added = []

    def change_cluster(step, system):
        seen[step] = {"pool": sorted(system.pool.members), "capacity_requested": system.capacity_requested}
        if step == 1:
            added.append(cluster.add_node(num_cpus=1))
            cluster.wait_for_nodes()
        elif step == 2:
            cluster.remove_node(added[0])

    cfg = load_config("tiny", [
        f"steps={STEPS}", f"output_dir={tmp_path}", f"model.cache_dir={Path(tiny_policy_path).parent}",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}", "rollout.max_new_tokens=16",
        "generators.num=1", "generators.min=1", "generators.max=2", "generators.num_cpus=1",
        "generators.shard_prompts=2", "ppo.minibatch_size=8", "ppo.micro_batch_size=8",
        "learner.num_cpus=0.5", "reward.num_cpus=0.25",
        "checkpoint.every=0", "logging.progress_bar=false", "logging.tensorboard=false",
    ])
    out = run(cfg, on_step_end=change_cluster)

    assert seen[1] == {"pool": ["gen-0"], "capacity_requested": True}
    assert seen[2]["pool"] == ["gen-0", "gen-1"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["pool/size"] for m in metrics] == [1, 2, 1]
    assert [m["pool/deaths"] for m in metrics] == [0, 0, 1]
    assert metrics[2]["pool/requeued_shards"] >= 1
    assert all(m["sync/verified"] == 1.0 and m["policy_version"] == m["step"] for m in metrics)

    rows = read_rollouts(out).to_pylist()
    for step in range(1, STEPS + 1):
        got = [r for r in rows if r["step"] == step]
        keys = Counter((r["prompt_index"], r["sample_index"]) for r in got)
        assert len(keys) == PROMPTS * SAMPLES and set(keys.values()) == {1}, f"step {step}"
        assert {r["policy_version"] for r in got} == {step - 1}
    by_step = {s: {r["generator_id"] for r in rows if r["step"] == s} for s in (1, 2, 3)}
    assert by_step == {1: {"gen-0"}, 2: {"gen-0", "gen-1"}, 3: {"gen-0"}}


def test_pool_below_min_is_a_clear_error(tmp_path, tiny_policy_path, cluster):
    """The only generator's node leaves and no replacement may start: PoolError naming the fix."""
    from ray_rlhf.generation.pool import PoolError

    def remove_worker(step, system):
        worker = next(n for n in cluster.worker_nodes)
        cluster.remove_node(worker)

    cfg = load_config("tiny", [
        "steps=2", f"output_dir={tmp_path}", f"model.cache_dir={Path(tiny_policy_path).parent}",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}", "rollout.max_new_tokens=16",
        "generators.num=1", "generators.num_cpus=1", "generators.max_restarts=0",
        "ppo.minibatch_size=8", "ppo.micro_batch_size=8", "learner.num_cpus=0.5", "reward.num_cpus=0.25",
        "checkpoint.every=0", "logging.progress_bar=false", "logging.tensorboard=false",
    ])
    with pytest.raises(PoolError, match=r"0 live generators, below generators.min=1.*generators.max_restarts=0"):
        run(cfg, on_step_end=remove_worker)
