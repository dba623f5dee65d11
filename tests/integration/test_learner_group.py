"""The learner group on a real local Ray: 1 rank vs 2 ranks (gloo, CPU), DDP and FSDP2.

The same scored batch, the same seed: one PPO update by one learner rank and by two must agree --
policy loss, value loss, grad norm and every updated parameter within 1e-5 (relative, per tensor
norm: AdamW's first step amplifies the last-bit differences of near-zero gradients elementwise).
A rank killed in the middle of an update fails the step at once with an error naming it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from ray_rlhf.config import load_config
from ray_rlhf.learning.group import LearnerError, LearnerGroup

pytestmark = pytest.mark.integration

PROMPTS = ["The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog", "Rain falls", "Birds sing"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def batch(tiny_policy_path, local_ray):
    """12 scored sequences of the tiny model, as an ObjectRef (what the reward actor hands over)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_rlhf.bench.hf_sampler import hf_generate
    from ray_rlhf.records import PromptItem, SamplingSpec

    lm = AutoModelForCausalLM.from_pretrained(tiny_policy_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    out = hf_generate(lm, tok, [PromptItem(i, p) for i, p in enumerate(PROMPTS)],
                      SamplingSpec(n=2, max_new_tokens=10, seed=4))
    rng = np.random.default_rng(0)
    return ray.put(out.with_rewards(rng.random(len(out)), {}))


def cfg_for(path, ranks: int, strategy: str, *extra):
    return load_config("tiny", [
        f"learner.num={ranks}", f"learner.strategy={strategy}", "learner.num_cpus=0.5", "learner.torch_threads=1",
        "ppo.epochs=1", "ppo.minibatch_size=6", "ppo.micro_batch_size=2", "rollout.prompts_per_step=6",
        "rollout.samples_per_prompt=2", "learner.collective_timeout_s=60", *extra])


def full_state(learner):
    """Runs on every rank: the whole (policy + value head) state, gathered on rank 0."""
    from ray_rlhf.learning import parallel

    o = learner.options
    return parallel.full_state_dict(learner.model, o.world_size, o.strategy)


def one_update(path, ranks: int, strategy: str, batch):
    group = LearnerGroup(cfg_for(path, ranks, strategy), path)
    try:
        group.ready()
        stats = group.step(batch)
        states = ray.get([r.__ray_call__.remote(full_state) for r in group.ranks])
        return stats, {k: v.clone() for k, v in states[0].items()}
    finally:
        group.shutdown()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.fixture(scope="module")
def one_rank(tiny_policy_path, batch):
    return one_update(tiny_policy_path, 1, "ddp", batch)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_one_rank_update(tiny_policy_path, batch, one_rank, strategy):
    s1, p1 = one_rank
    s2, p2 = one_update(tiny_policy_path, 2, strategy, batch)
    print(f"\n{strategy}: policy loss {s1.policy_loss:.8f} vs {s2.policy_loss:.8f}, grad norm {s1.grad_norm:.8f} vs "
          f"{s2.grad_norm:.8f}")
    for key in ("policy_loss", "value_loss", "grad_norm", "entropy", "approx_kl", "clipfrac", "kl_ref", "return_mean"):
        a, b = getattr(s2, key), getattr(s1, key)
        assert abs(a - b) <= 1e-5 * max(abs(b), 1e-2), (key, a, b)  # losses near 0: an absolute 1e-7 floor
    assert s2.optimizer_steps == s1.optimizer_steps == 2 and s2.response_tokens == s1.response_tokens
    assert set(p1) == set(p2) and len(p1) > 10
    worst = max((rel(p2[k], p1[k]), k) for k in p1)
    print(f"{strategy}: worst relative parameter difference {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-5, worst


def test_a_dead_rank_fails_the_step_quickly_naming_it(tiny_policy_path, batch):
    import threading

    group = LearnerGroup(cfg_for(tiny_policy_path, 2, "ddp", "ppo.epochs=1000"), tiny_policy_path)
    group.ready()
    outcome: dict = {}

    def step():
        try:
            group.step(batch)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    worker = threading.Thread(target=step)
    t0 = time.monotonic()
    worker.start()
    time.sleep(5)  # inside the update (1000 epochs take minutes)
    ray.kill(group.ranks[1], no_restart=True)
    worker.join(timeout=120)
    assert not worker.is_alive(), "the step hangs after a rank died"
    assert isinstance(outcome.get("error"), LearnerError), outcome
    assert "learner rank 1 of 2 died" in str(outcome["error"])
    assert time.monotonic() - t0 < 60  # no wait for the collective timeout
