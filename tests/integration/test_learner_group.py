"""The learner group on a real local Ray: 1 rank vs 2 ranks (gloo, CPU), DDP and FSDP2.

The same scored batch, the same seed: one PPO update by one learner rank and by two must agree --
policy loss, value loss, grad norm within 1e-5 of the size of their terms (:data:`TERM_SCALE`), and
every updated parameter within 1e-5 (relative, per tensor norm: AdamW's first step amplifies the
last-bit differences of near-zero gradients elementwise).
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


TERM_SCALE = {"policy_loss": 1.0, "value_loss": 1e-2, "grad_norm": 1e-2, "entropy": 1e-2, "approx_kl": 1e-2,
              "clipfrac": 1e-2, "kl_ref": 1e-2, "return_mean": 1e-2}
"""The size of the terms a statistic sums, for the absolute floor of its tolerance. A sum in another
order moves by a few ulps of its TERMS, not of the result: the policy loss sums ratio * advantage
over tokens with whitened advantages (|A| ~ 1), so a loss near 0 (-0.0048) moves by ~1e-7 between
1 and 2 ranks on an AVX-512 CPU (2.1e-7 seen on an Intel Xeon) -- fp32 noise of unit-size terms,
which a relative 1e-5 of the result cannot absorb. A real error (a token or a rank counted twice or
missed) moves it by ~1e-2 and still fails; the per-tensor parameter check below is the strict one."""


def cfg_for(path, ranks: int, strategy: str, *extra):
    return load_config("tiny", [
        f"learner.num={ranks}", f"learner.strategy={strategy}", "learner.num_cpus=0.5", "learner.torch_threads=1",
        "ppo.epochs=1", "ppo.minibatch_size=6", "ppo.micro_batch_size=2", "rollout.prompts_per_step=6",
        "rollout.samples_per_prompt=2", "learner.collective_timeout_s=60", "ppo.packing=off", *extra])


def full_grads(learner):
    """Runs on every rank: the gradient each parameter of policy + value head holds after the step
    (the last minibatch's, after the norm clip), whole tensors (gathered from the shards under FSDP)."""
    from ray_rlhf.learning import parallel

    out = {}
    for name, p in parallel.unwrap(learner.model).named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = g.detach().clone()
    return out


def one_update(path, ranks: int, strategy: str, batch, *extra):
    group = LearnerGroup(cfg_for(path, ranks, strategy, *extra), path)
    try:
        group.ready()
        stats = group.step(batch)
        grads = ray.get([r.__ray_call__.remote(full_grads) for r in group.ranks])
        return stats, grads[0]
    finally:
        group.shutdown()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


ONE_STEP = ("ppo.minibatch_size=12",)
"""One optimizer step on the whole batch: the gradients compared are both taken at the initial
weights (after a first AdamW step, lr * m / sqrt(v) turns last-bit differences of near-zero
gradients into differences of 2 lr: parameters after a step are no place for a 1e-5 comparison)."""


@pytest.fixture(scope="module")
def one_rank(tiny_policy_path, batch):
    return one_update(tiny_policy_path, 1, "ddp", batch, *ONE_STEP)


def reference_bytes(learner) -> int:
    """Runs on every rank: the bytes of the frozen reference's parameters this rank holds."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in learner.reference.parameters())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp+shard_reference", "ddp+packing"])
def test_two_ranks_give_the_one_rank_update(tiny_policy_path, batch, one_rank, strategy):
    """Two ranks against one padded rank; ``+packing``: the two ranks run packed micro-batches
    (``ppo.packing=on``, first-fit under a token budget), so packing and ranks are checked together."""
    s1, p1 = one_rank
    shard_ref = strategy.endswith("+shard_reference")
    packing = strategy.endswith("+packing")
    strategy = strategy.removesuffix("+shard_reference").removesuffix("+packing")
    extra = (*ONE_STEP, f"learner.shard_reference={str(shard_ref).lower()}")
    if packing:
        extra = (*extra, "ppo.packing=on", "ppo.micro_batch_tokens=64")
    if shard_ref:  # the reference's memory per rank, measured: about half of the whole with 2 ranks
        group = LearnerGroup(cfg_for(tiny_policy_path, 2, strategy, *extra), tiny_policy_path)
        try:
            group.ready()
            held = ray.get([r.__ray_call__.remote(reference_bytes) for r in group.ranks])
        finally:
            group.shutdown()
        whole = sum(v.nbytes for k, v in p1.items() if k.startswith("lm."))  # the policy LM = the reference's size
        print(f"\nreference bytes per rank {held} of {whole}")
        assert all(0.4 * whole < h < 0.6 * whole for h in held), (held, whole)
    s2, p2 = one_update(tiny_policy_path, 2, strategy, batch, *extra)
    print(f"\n{strategy}: policy loss {s1.policy_loss:.8f} vs {s2.policy_loss:.8f}, grad norm {s1.grad_norm:.8f} vs "
          f"{s2.grad_norm:.8f}")
    for key in ("policy_loss", "value_loss", "grad_norm", "entropy", "approx_kl", "clipfrac", "kl_ref", "return_mean"):
        a, b = getattr(s2, key), getattr(s1, key)
        assert abs(a - b) <= 1e-5 * max(abs(b), TERM_SCALE[key]), (key, a, b)
    assert s2.optimizer_steps == s1.optimizer_steps == 1 and s2.response_tokens == s1.response_tokens
    assert set(p1) == set(p2) and len(p1) > 10
    worst = max((rel(p2[k], p1[k]), k) for k in p1)
    print(f"{strategy}: worst relative gradient difference {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-5, worst


@pytest.fixture(scope="module")
def four_informative_rows(batch):
    """The batch rescored so that a group estimator with ``algo.drop_zero_std_groups`` keeps 4 of its
    12 rows: prompts 0-3 score the same in both samples (dropped), prompts 4-5 differ."""
    rollouts = ray.get(batch)
    reward = np.where(rollouts.prompt_index < 4, 0.5, 0.0) + np.where(rollouts.prompt_index >= 4,
                                                                     rollouts.sample_index * 0.7 + 0.1, 0.0)
    return ray.put(rollouts.with_rewards(reward, {}))


def test_a_rank_without_rows_in_a_minibatch_keeps_step_with_ddp(tiny_policy_path, four_informative_rows):
    """4 rows left in minibatches of 3: the last minibatch holds 1 row, so one of 2 ranks has none. It
    still takes part in every gradient all-reduce (an empty pass), and the gradient is one rank's.
    (Before: the idle rank skipped to the stats all-reduce, which paired with the other's gradient
    buckets -- garbage sums or a crash.)"""
    extra = ("algo.estimator=grpo", "algo.drop_zero_std_groups=true", "ppo.minibatch_size=3",
             "ppo.micro_batch_size=1", "ppo.lr=1e-9")  # weights ~still: the 2nd minibatch's gradients compare too

    (s1, p1), (s2, p2) = (one_update(tiny_policy_path, n, "ddp", four_informative_rows, *extra) for n in (1, 2))
    assert s1.dropped_sequences == s2.dropped_sequences == 8
    assert s1.optimizer_steps == s2.optimizer_steps == 2  # minibatches of 3 rows and of 1 row
    for key in ("policy_loss", "grad_norm", "entropy", "kl_loss"):
        a, b = getattr(s2, key), getattr(s1, key)
        assert abs(a - b) <= 1e-5 * max(abs(b), TERM_SCALE.get(key, 1e-2)), (key, a, b)
    worst = max((rel(p2[k], p1[k]), k) for k in p1)
    assert worst[0] < 1e-5, worst


@pytest.mark.parametrize("estimator,agg", [("grpo", "seq_mean_token_mean"), ("reinforce_pp", "seq_mean_token_sum_norm")])
def test_each_loss_aggregation_gives_the_one_rank_gradient_with_two_ranks(tiny_policy_path, batch, estimator, agg):
    """token_mean is the test above; the per-sequence forms divide by sequence counts of the whole
    minibatch, which each rank must see, not its own rows. Critic-free estimators at 2 ranks too:
    GRPO's group moments and REINFORCE++'s whole-batch moments are over the whole batch on each rank."""
    extra = (*ONE_STEP, f"algo.estimator={estimator}", f"algo.loss_agg={agg}")
    (s1, p1), (s2, p2) = (one_update(tiny_policy_path, n, "ddp", batch, *extra) for n in (1, 2))
    for key in ("policy_loss", "grad_norm", "kl_loss"):
        a, b = getattr(s2, key), getattr(s1, key)
        assert abs(a - b) <= 1e-5 * max(abs(b), TERM_SCALE.get(key, 1e-2)), (key, a, b)
    worst = max((rel(p2[k], p1[k]), k) for k in p1)
    assert worst[0] < 1e-5, worst


def test_two_ranks_give_the_one_rank_update_on_multi_turn_rows(tiny_policy_path, batch):
    """The batch as multi-turn rows: every 4th response token from the 3rd on (before the last) an
    observation, a turn reward of 0.3 on the model token before each. The token counts the ranks
    divide by are the model's tokens of the whole minibatch, on every rank."""
    import dataclasses

    rollouts = ray.get(batch)
    loss_mask, turns = [], []
    for n in rollouts.response_lengths:
        m = np.array([0 if j % 4 == 2 and j < n - 1 else 1 for j in range(n)], np.int8)
        t = np.where(np.append(m[1:], 1) == 0, 0.3, 0.0).astype(np.float32)
        loss_mask.append(m)
        turns.append(t)
    multi = ray.put(dataclasses.replace(rollouts, loss_mask=np.concatenate(loss_mask),
                                        token_reward=np.concatenate(turns)))
    (s1, p1), (s2, p2) = (one_update(tiny_policy_path, n, "ddp", multi, *ONE_STEP) for n in (1, 2))
    assert s1.observation_tokens == s2.observation_tokens == sum(int((m == 0).sum()) for m in loss_mask) > 0
    for key in ("policy_loss", "value_loss", "grad_norm", "entropy", "approx_kl", "kl_ref", "return_mean"):
        a, b = getattr(s2, key), getattr(s1, key)
        assert abs(a - b) <= 1e-5 * max(abs(b), TERM_SCALE[key]), (key, a, b)
    worst = max((rel(p2[k], p1[k]), k) for k in p1)
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


LORA = (*ONE_STEP, "lora.rank=8", "lora.alpha=16")
"""LoRA on every linear layer of the trunk: the adapters and the value head train, the base is frozen."""


def lora_after_step(learner):
    """Runs on every rank after a LoRA step: the trainable tensors' gradients and values (whole
    tensors), the merged weights rank 0 exports, and the reference's (adapters off) and the policy's
    log-probs of a fixed batch -- a forward every rank must join under FSDP2."""
    from ray_rlhf.learning import parallel

    def whole(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    full = {}
    for name, p in parallel.unwrap(learner.model).named_parameters():
        if p.requires_grad:
            full[name] = (whole(p.grad).detach().clone(), whole(p.detach()).clone())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.long)
    resp = torch.randint(3, 200, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.long)
    ref = learner.reference(*ids, *resp)
    with torch.no_grad():
        pol = learner.model(*ids, *resp, with_values=False, with_entropy=False).logprobs
    merged = learner.hf_state_dict() if learner.comm.rank == 0 else None
    return full, ref, pol, merged


def trainable_values(learner):
    """Runs on every rank: the trainable tensors, whole (gathered under FSDP2), and whether sharded."""
    from ray_rlhf.learning import parallel

    model = parallel.unwrap(learner.model)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}, parallel.is_sharded(model)


def lora_update(path, ranks: int, strategy: str, batch, checkpoint=None):
    """One LoRA step; with ``checkpoint`` (a directory) also a round trip: save, a second step, load:
    the trainable tensors are the saved ones again (the sharded adapters under FSDP2)."""
    group = LearnerGroup(cfg_for(path, ranks, strategy, *LORA), path)
    try:
        group.ready()
        stats = group.step(batch)
        after = ray.get([r.__ray_call__.remote(lora_after_step) for r in group.ranks])[0]
        if checkpoint is not None:
            def values():  # rank 1's view; every rank joins (gathering shards is a collective)
                return ray.get([r.__ray_call__.remote(trainable_values) for r in group.ranks])[1]

            group.save(checkpoint)
            saved, sharded = values()
            import dataclasses

            rollouts = ray.get(batch)
            group.step(dataclasses.replace(rollouts, policy_version=rollouts.policy_version + 1))
            moved = values()[0]
            group.load(checkpoint)
            loaded = values()[0]
            assert sharded == (strategy == "fsdp")
            assert any(not torch.equal(moved[k], saved[k]) for k in saved)
            assert all(torch.equal(loaded[k], saved[k]) for k in saved)
        return stats, after
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def lora_one_rank(tiny_policy_path, batch):
    return lora_update(tiny_policy_path, 1, "ddp", batch)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_two_ranks_give_the_one_rank_update(tiny_policy_path, batch, lora_one_rank, strategy, tmp_path):
    """lora.rank=8: two ranks (DDP; FSDP2 sharding the frozen base and the adapters alike) against
    one. Statistics as above; the gradients of the adapters and the value head within 1e-5 per tensor,
    and so are the merged weights rank 0 exports after the step and the reference's log-probs (the
    policy with its adapters off, through the sharded policy under FSDP2). The updated adapters
    themselves: within 1e-3 per tensor (7.6e-5 seen): B starts at 0 and AdamW's first step moves each
    element by lr * g / (|g| + eps), which turns last-bit differences of near-zero gradient elements
    into differences of up to lr (the ONE_STEP note); merged, those are 1e-7 of the weights. Then a
    checkpoint round trip at two ranks (``lora_update``)."""
    s1, (f1, ref1, pol1, m1) = lora_one_rank
    s2, (f2, ref2, pol2, m2) = lora_update(tiny_policy_path, 2, strategy, batch, checkpoint=tmp_path / "ckpt")
    for key in ("policy_loss", "value_loss", "grad_norm", "entropy", "approx_kl", "clipfrac", "kl_ref", "return_mean"):
        a, b = getattr(s2, key), getattr(s1, key)
        assert abs(a - b) <= 1e-5 * max(abs(b), TERM_SCALE[key]), (key, a, b)
    assert set(f1) == set(f2) and sum(".lora_B." in k for k in f1) == 14 and "value_head.weight" in f1
    assert all(".lora_" in k or k.startswith("value_head.") for k in f1)
    worst_grad = max((rel(f2[k][0], f1[k][0]), k) for k in f1 if f1[k][0].norm() > 0)
    worst_value = max((rel(f2[k][1], f1[k][1]), k) for k in f1)
    worst_merged = max((rel(m2[k], m1[k]), k) for k in m1)
    print(f"\nlora {strategy}: worst relative difference: gradient {worst_grad[0]:.2e} ({worst_grad[1]}), updated "
          f"{worst_value[0]:.2e} ({worst_value[1]}), merged {worst_merged[0]:.2e}; reference "
          f"{(ref2 - ref1).abs().max():.2e}, adapted vs reference {(pol1 - ref1).abs().max():.2e}")
    assert worst_grad[0] < 1e-5 and worst_value[0] < 1e-3 and worst_merged[0] < 1e-5, (worst_grad, worst_value, worst_merged)
    assert set(m1) == set(m2) and not any(".lora_" in k or ".base_layer." in k for k in m2)
    assert torch.allclose(ref2, ref1, atol=1e-5, rtol=0) and torch.allclose(pol2, pol1, atol=1e-5, rtol=0)
    assert (pol1 - ref1).abs().max() > 1e-3  # the adapters moved the policy; the reference stayed the base
