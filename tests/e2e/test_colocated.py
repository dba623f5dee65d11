"""The front door of ``placement=colocated`` on a CPU machine: ``ray-rlhf train --config tiny
placement=colocated ...`` as a subprocess, on a local Ray declaring two LOGICAL GPUs
(``ray.num_gpus=2``: no hardware behind them).

What the run must show (``<output_dir>/phases.jsonl``, :mod:`ray_rlhf.run.placement`):

- placement: one placement group; generator ``gen-i`` and learner rank ``i`` at bundle ``i`` and on
  the same GPU id (Ray's, also in ``CUDA_VISIBLE_DEVICES``), the two bundles on different GPUs; and
  although Ray set ``CUDA_VISIBLE_DEVICES``, torch finds no CUDA device in any actor, the learner
  computes on ``cpu`` and vLLM's CPU build started (platform ``cpu``);
- phase order, as each ENGINE recorded it: between two transitions an engine only loads weights and
  generates and then sleeps (``training`` lines end with ``sleep``), and wakes at the next transition
  (``generation`` lines are ``wake_up`` alone); the weights of step 1's update are loaded after the
  wake-up and before step 2's generation; nothing is released on CPU (no sleep mode there);
- the learner moved its AdamW state at each transition after the first update (bytes > 0), none before;
- the metrics carry the two new phases' times (``time/sleep``, ``time/wake``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

STEPS = 2


@pytest.fixture(scope="module")
def colocated_run(tmp_path_factory, tiny_policy_path):
    out = tmp_path_factory.mktemp("colocated")
    cmd = [sys.executable, "-m", "ray_rlhf", "train", "--config", "tiny", "placement=colocated",
           "generators.num=2", "learner.num=2", "generators.num_gpus=0.5", "learner.num_gpus=0.5",
           "generators.num_cpus=0.25", "learner.num_cpus=0.25", "ray.num_gpus=2", "ray.num_cpus=2",
           "ray.gpu_memory_gib=80", f"steps={STEPS}", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
           "generators.shard_prompts=2", "rollout.max_new_tokens=8", "ppo.minibatch_size=8", "ppo.micro_batch_size=4",
           "logging.progress_bar=false", "logging.tensorboard=false", f"output_dir={out}",
           f"model.cache_dir={tiny_policy_path.parent}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, metrics


def test_generator_i_and_learner_rank_i_share_bundle_i_and_compute_on_cpu(colocated_run):
    rows, _ = colocated_run
    placed = rows[0]
    assert placed["phase"] == "placed"
    actors = placed["actors"]
    assert sorted(actors) == ["gen-0", "gen-1", "learner-0", "learner-1"]
    assert len({a["placement_group"] for a in actors.values()}) == 1 and actors["gen-0"]["placement_group"]
    gpus = []
    for i in (0, 1):
        gen, rank = actors[f"gen-{i}"], actors[f"learner-{i}"]
        assert gen["bundle_index"] == rank["bundle_index"] == i
        assert len(gen["gpu_ids"]) == 1 and gen["gpu_ids"] == rank["gpu_ids"]  # one GPU, shared
        assert gen["cuda_visible_devices"] == rank["cuda_visible_devices"] == gen["gpu_ids"][0]
        assert not gen["cuda_available"] and not rank["cuda_available"]  # logical GPUs: no device behind
        assert rank["device"] == "cpu" and gen["device"] == "cpu"  # the learner and vLLM's CPU build
        gpus.append(gen["gpu_ids"][0])
    assert gpus[0] != gpus[1]


def test_engines_sleep_after_generation_and_wake_before_the_next(colocated_run):
    rows, _ = colocated_run
    phases = rows[1:]
    assert [(r["step"], r["phase"]) for r in phases] == [
        (1, "generation"), (1, "training"), (1, "generation"), (2, "training"), (2, "generation")]
    assert not any(r["engine_memory_released"] for r in phases)  # vLLM's CPU build: no sleep mode
    for r in phases[1:]:
        assert sorted(r["engines"]) == ["gen-0", "gen-1"]
        for events in r["engines"].values():
            if r["phase"] == "training":
                assert events[-1] == "sleep" and set(events[:-1]) <= {"load", "generate"}
            else:
                assert events == ["wake_up"]
    assert sum(e.count("generate") for r in phases for e in r["engines"].values()) >= 2  # one per step at least
    for events in phases[3]["engines"].values():  # step 2: version 1 loaded after the wake-up, before generating
        assert events[0] == "load"
    # no AdamW state before the first update (AdamW builds it lazily); moved at every transition after
    assert [r["learner_bytes_moved"] > 0 for r in phases] == [False, False, True, True, True]


def test_the_metrics_time_the_sleep_and_the_wake(colocated_run):
    _, metrics = colocated_run
    assert len(metrics) == STEPS
    for row in metrics:
        assert row["time/sleep"] >= 0 and row["time/wake"] >= 0
