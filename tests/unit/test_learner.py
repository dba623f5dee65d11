"""The Learner and the policy with a value head, without Ray or vLLM (tiny model, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_rlhf.bench.hf_sampler import hf_generate
from ray_rlhf.config.schema import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.records import PromptItem, SamplingSpec
from ray_rlhf.sync.checksum import state_dict_checksum
from tests.batches import make_batch

PROMPTS = ["The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog"]


def _rollout(prompt_ids, response_ids, reward=1.0, version=0):
    return dict(prompt_ids=prompt_ids, response_ids=response_ids, reward=reward, policy_version=version)


@pytest.fixture(scope="module")
def learner(tiny_policy_path):
    return Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8), KLConfig(), seed=0)


@pytest.fixture(scope="module")
def rollouts(learner):
    items = [PromptItem(i, p) for i, p in enumerate(PROMPTS)]
    out = hf_generate(learner.model.lm, learner.tokenizer, items, SamplingSpec(n=2, max_new_tokens=12, seed=1))
    return out.with_rewards(np.arange(len(out)) % 3.0, {})


def test_collate_pads_prompts_left_and_responses_right():
    b = collate(make_batch([_rollout([5, 6, 7], [8]), _rollout([9], [10, 11, 12], reward=2.0, version=3)]), pad_id=2)
    assert b.prompt_ids.tolist() == [[5, 6, 7], [2, 2, 9]]
    assert b.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.response_ids.tolist() == [[8, 2, 2], [10, 11, 12]]
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert b.sampler_logprobs.tolist() == [[-1, 0, 0], [-1, -1, -1]]
    assert b.scores.tolist() == [1.0, 2.0] and b.policy_versions.tolist() == [0, 3]


def test_collate_refuses_unscored_rollouts():
    with pytest.raises(ValueError, match="scored"):
        collate(make_batch([_rollout([1], [2], reward=None)]), pad_id=0)


def test_padded_forward_matches_unpadded_hf_forward(learner, rollouts):
    """Left padding + position ids must give each sequence exactly its unpadded logprobs."""
    batch = collate(rollouts, learner.pad_id)
    with torch.no_grad():
        out = learner.model(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        for i in range(len(rollouts)):
            p_ids = rollouts.prompt_ids[rollouts.prompt_offsets[i]:rollouts.prompt_offsets[i + 1]].tolist()
            r_ids = rollouts.response_ids[rollouts.response_offsets[i]:rollouts.response_offsets[i + 1]].tolist()
            ids = torch.tensor([p_ids + r_ids])
            logits = learner.model.lm(ids).logits[0, len(p_ids) - 1 : -1]
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(r_ids)[:, None]).squeeze(-1)
            n = len(r_ids)
            torch.testing.assert_close(out.logprobs[i, :n], expected, atol=1e-5, rtol=1e-5)
    assert out.values.shape == batch.response_ids.shape
    assert torch.all(out.entropy[batch.response_mask.bool()] > 0)


def test_sampler_and_learner_logprobs_agree(learner, rollouts):
    """The sampler-vs-learner logprob metric is ~0 when both hold the same weights."""
    _, stats = learner.prepare(collate(rollouts, learner.pad_id))
    assert stats["sampler_logprob_diff"] < 1e-4


def test_value_head_sits_on_the_policy_trunk(learner):
    model = learner.model
    assert model.critic is None
    assert model.value_head.in_features == model.lm.config.hidden_size
    assert set(learner.hf_state_dict()) == set(model.lm.state_dict())  # value head not exported


def _grads(tiny_policy_path, rollouts, micro):
    torch.manual_seed(0)
    ppo = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=micro, lr=1e-3)
    L = Learner(str(tiny_policy_path), ppo, KLConfig(), seed=0)
    prep, _ = L.prepare(collate(rollouts, L.pad_id))
    # perturb the policy so that ratios differ from 1 (some tokens clipped)
    with torch.no_grad():
        for p in L.model.lm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    L.model.train()
    L.optimizer.zero_grad()
    n_tokens = prep.batch.response_mask.sum()
    for idx in torch.arange(len(prep.batch)).split(micro):
        L._micro_step(prep, idx, n_tokens, n_tokens)
    return {n: p.grad.clone() for n, p in L.model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_full_minibatch(tiny_policy_path, rollouts):
    """Micro-batches of 2 accumulate exactly the gradient of one pass over the minibatch of 8."""
    full, acc = _grads(tiny_policy_path, rollouts, 8), _grads(tiny_policy_path, rollouts, 2)
    assert set(full) == set(acc) and len(full) > 10
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def stepped(tiny_policy_path, rollouts):
    """A learner after one step of 2 epochs x 2 minibatches of 4 (micro-batches of 2), the weights'
    checksum before it, and the step's stats."""
    L = Learner(str(tiny_policy_path), PPOConfig(epochs=2, minibatch_size=4, micro_batch_size=2),
                KLConfig(), seed=0)
    before = state_dict_checksum(L.hf_state_dict())
    return L, before, L.step(rollouts)


def test_step_takes_one_adamw_step_per_minibatch_and_moves_only_the_policy(stepped):
    L, before, stats = stepped
    assert L.version == stats.version == 1
    # AdamW's own step counter, on every parameter: 2 epochs x 8/4 minibatches
    assert {int(L.optimizer.state[p]["step"]) for p in L.model.parameters()} == {4}
    assert stats.optimizer_steps == 4
    assert state_dict_checksum(L.hf_state_dict()) != before == state_dict_checksum(L.reference.lm.state_dict())
    d = stats.to_dict()
    assert all(torch.isfinite(torch.tensor(float(v))) for v in d.values()), d


def _xxh3_128(tensors: dict[str, torch.Tensor]) -> str:
    """``state_dict_checksum``'s documented algorithm written out: XXH3-128 over the tensors in name
    order, each as the line ``name|dtype|shape`` then its bytes (C order, little-endian). Its
    canonical form turns -0.0 into +0.0 and subnormals into 0; the caller checks there are none,
    so the raw bytes are the canonical ones."""
    import xxhash

    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_weights_checksum_is_the_hash_of_the_saved_checkpoint(stepped, tmp_path):
    """The checksum the generators verify against, recomputed by hand from the safetensors file the
    trained policy saves: a checksum that skipped a tensor or ignored the values would differ."""
    from safetensors.torch import load_file

    L, _, _ = stepped
    L.model.lm.save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(tmp_path / "model.safetensors")
    exported = L.hf_state_dict()
    assert set(saved) == set(exported) and len(saved) > 10
    for name, t in saved.items():
        assert t.dtype == torch.float32 and torch.equal(t, exported[name]), name
        tiny = (t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)
        negative_zero = (t == 0) & torch.signbit(t)
        assert not (tiny.any() or negative_zero.any()), name  # raw bytes == canonical bytes
    assert L.weights_checksum() == _xxh3_128(saved)
    one = sorted(saved)[3]
    assert L.weights_checksum((one,)) == _xxh3_128({one: saved[one]}) != L.weights_checksum()
    initial = load_file(Path(L.model_path) / "model.safetensors")
    assert _xxh3_128(initial) == state_dict_checksum(L.reference.lm.state_dict()) != L.weights_checksum()


def test_update_at_pi_old_has_the_ppo_loss_by_hand_and_the_value_head_fits_the_returns(tiny_policy_path, rollouts):
    """Three passes of ``update`` (one epoch each) over one prepared batch: one minibatch of all 8
    sequences in two micro-batches of 4, advantages not whitened (so their mean is not 0 by
    construction). At the first pass the policy is still pi_old: every ratio is 1, clipping is
    inactive and PPO's loss is ``-sum_t m_t A_t / N``; the values are still the old values, so the
    value loss is ``0.5 sum_t m_t (V_old_t - R_t)^2 / N``. On a fixed batch the value loss then
    falls at every pass (without the value clip, which stops each value 0.2 from its old one:
    measured 0.449, 0.291, 0.178 here)."""
    ppo = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=4, value_clip=None)
    L = Learner(str(tiny_policy_path), ppo, KLConfig(), seed=0,
                options=LearnerOptions(algo=AlgoConfig(whiten_advantages=False)))
    prep, _ = L.prepare(collate(rollouts, L.pad_id))
    m = prep.batch.response_mask
    N = m.sum()
    mean_adv = float((prep.advantages * m).sum() / N)
    assert abs(mean_adv) > 1e-2  # not whitened: the check below is not 0 == 0
    passes = [L.update(prep) for _ in range(3)]
    first = passes[0]
    assert first["policy_loss"] == pytest.approx(-mean_adv, rel=1e-4, abs=1e-6)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["clipfrac"] == 0.0
    vf0 = float(0.5 * (((prep.old_values - prep.returns) ** 2) * m).sum() / N)
    assert first["value_loss"] == pytest.approx(vf0, rel=1e-4)
    vf = [p["value_loss"] for p in passes]
    print(f"value loss by pass {vf}; policy loss by pass {[p['policy_loss'] for p in passes]}")
    assert vf[0] > vf[1] > vf[2] and vf[2] < 0.6 * vf[0], vf
    assert [p["optimizer_steps"] for p in passes] == [1, 1, 1]
    assert {int(L.optimizer.state[p]["step"]) for p in L.model.parameters()} == {3}


def test_save_and_load_state_round_trip(tiny_policy_path, rollouts, tmp_path):
    ppo, kl = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=4), KLConfig(adaptive=True, target=1.0, horizon=100)
    a = Learner(str(tiny_policy_path), ppo, kl, seed=0)
    a.step(rollouts)
    a.save_state(tmp_path)
    b = Learner(str(tiny_policy_path), ppo, kl, seed=123)
    b.load_state(tmp_path)
    assert b.version == a.version == 1 and b.kl_ctl.value == a.kl_ctl.value != 0.05
    assert b.weights_checksum() == a.weights_checksum()
    torch.testing.assert_close(b.model.value_head.weight, a.model.value_head.weight)
    # the reference stays the initial model, not the checkpoint
    assert state_dict_checksum(b.reference.lm.state_dict()) != b.weights_checksum()
    # the next step is identical (optimizer moments, RNG for minibatch shuffling restored)
    again = dataclasses.replace(rollouts, policy_version=rollouts.policy_version + 1)  # sampled by version 1
    sa, sb = a.step(again), b.step(again)
    assert sa.policy_loss == pytest.approx(sb.policy_loss, rel=1e-5, abs=1e-7)
    assert b.weights_checksum() == a.weights_checksum()
    # the saved policy is a plain Hugging Face checkpoint
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "policy") is not None


def test_dropout_is_off_in_the_update(tmp_path):
    """GPT-2's config has dropout 0.1; with dropout live the first update would see ratios far
    from 1 on unchanged weights. With lr ~ 0 the policy never moves: every ratio is 1 up to the
    float round-off of differently padded micro-batches (~1e-6)."""
    from tests.architectures import build_arch

    path = build_arch("gpt2", tmp_path / "gpt2", seed=0)
    learner = Learner(str(path), PPOConfig(epochs=2, minibatch_size=4, micro_batch_size=2, lr=1e-30), KLConfig(),
                      seed=0)
    items = [PromptItem(i, p) for i, p in enumerate(PROMPTS)]
    batch = hf_generate(learner.model.lm, learner.tokenizer, items, SamplingSpec(n=2, max_new_tokens=8, seed=1))
    stats = learner.step(batch.with_rewards(np.arange(len(batch)) % 2.0, {}))
    assert abs(stats.ratio_mean - 1) < 1e-5 and abs(stats.ratio_max - 1) < 1e-5 and stats.clipfrac == 0.0, stats
    assert not any(m.training for m in learner.model.modules())
