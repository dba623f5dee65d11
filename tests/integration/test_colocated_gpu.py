"""GPU-only checks of ``placement=colocated`` (skipped without CUDA): what the CPU tests cannot see.

- the engines really sleep (vLLM's CUDA build has sleep mode: ``engine_memory_released`` in every
  transition of ``phases.jsonl``) and the run still trains: each engine reads back the learner's
  final weights after a sleep/wake cycle (the sync loads into a woken engine);
- the learner's offload frees GPU memory: the AdamW moments leave the device (``memory_allocated``
  drops by at least their size) and come back for an update equal to one without the round trip.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_colocated_run_sleeps_the_engines_on_gpu(tmp_path, tiny_policy_path):
    import ray

    from ray_rlhf.config import load_config
    from ray_rlhf.run.driver import run
    from ray_rlhf.sync.receiver import WeightReceiver
    from ray_rlhf.sync.remote import call

    cfg = load_config("tiny", [
        f"output_dir={tmp_path}", f"model.cache_dir={tiny_policy_path.parent}", "logging.progress_bar=false",
        "steps=2", "placement=colocated", "generators.num=1", "learner.num=1", "generators.num_gpus=0.5",
        "learner.num_gpus=0.5", "generators.gpu_memory_utilization=0.3", "learner.device=cuda",
        "sync.verify=true", "rollout.prompts_per_step=8", "ppo.minibatch_size=32",
    ])
    final = {}

    def on_finish(actors) -> None:
        engines = ray.get([call(g, WeightReceiver.engine_checksum) for g in actors.pool.handles.values()])
        final["ok"] = [ray.get(actors.learners.source.weights_checksum.remote(tuple(e.names))) == e.checksum
                       for e in engines]

    try:
        run(cfg, on_finish=on_finish)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "phases.jsonl").read_text().splitlines()]
    transitions = [r for r in rows if r["phase"] in ("training", "generation") and r["engines"]]
    assert transitions and all(r["engine_memory_released"] for r in transitions)
    assert final["ok"] == [True]


def test_offload_frees_the_adamw_state_on_gpu():
    from torch import nn

    from ray_rlhf.learning.engine import Engine, EngineOptions, Optimization

    def engine():
        torch.manual_seed(0)
        model = nn.Module()
        model.lm, model.critic = nn.Linear(1024, 1024).cuda(), None
        optim = Optimization(epochs=1, minibatch_size=1, micro_batch_size=1, micro_batch_tokens=None, lr=0.1,
                             max_grad_norm=1e9)
        return Engine(model, None, EngineOptions(), optim, device="cuda", seed=0)

    def step(eng):
        eng.optimizer.zero_grad(set_to_none=True)
        eng.model.lm.weight.square().sum().backward()
        eng.optimizer.step()

    plain, moved = engine(), engine()
    step(plain), step(moved)
    before = torch.cuda.memory_allocated()
    nbytes = moved.offload()
    assert nbytes == 2 * (1024 * 1024 + 1024) * 4
    assert before - torch.cuda.memory_allocated() >= nbytes  # the moments (and the gradients) left the GPU
    assert moved.reload() == nbytes
    step(plain), step(moved)
    torch.testing.assert_close(moved.model.lm.weight, plain.model.lm.weight, rtol=0, atol=0)
