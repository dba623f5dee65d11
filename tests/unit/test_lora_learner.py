"""LoRA on the learner (``lora.rank > 0``), without Ray or vLLM (tiny model, CPU): what trains, the
reference with the adapters off, the first ratio, the merged export and the checkpoint round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ray_rlhf.bench.hf_sampler import hf_generate
from ray_rlhf.config.training import KLConfig, PPOConfig
from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.learning.loading import load_causal_lm
from ray_rlhf.learning.lora import AdapterOffReference, LoraSpec, linear_modules, resolve_targets
from ray_rlhf.models.policy import ReferenceModel
from ray_rlhf.records import PromptItem, SamplingSpec

PROMPTS = ["The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog"]
PPO = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8, lr=1e-2)


def lora_learner(path, rank=8, dropout=0.0, targets=None, ppo=PPO, seed=0) -> Learner:
    spec = LoraSpec(rank=rank, alpha=16.0, dropout=dropout, target_modules=targets)
    return Learner(str(path), ppo, KLConfig(), seed=seed, options=LearnerOptions(lora=spec))


@pytest.fixture(scope="module")
def rollouts(tiny_policy_path):
    lm = load_causal_lm(str(tiny_policy_path), "cpu")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    items = [PromptItem(i, p) for i, p in enumerate(PROMPTS)]
    out = hf_generate(lm, tok, items, SamplingSpec(n=2, max_new_tokens=10, seed=1))
    return out.with_rewards(np.arange(len(out)) % 3.0, {})


@pytest.fixture(scope="module")
def base_reference(tiny_policy_path):
    """The base model's log-prob function, from a separately loaded copy."""
    return ReferenceModel(load_causal_lm(str(tiny_policy_path), "cpu"))


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def test_default_targets_are_the_decoder_linear_layers(tiny_policy_path):
    lm = load_causal_lm(str(tiny_policy_path), "cpu")
    names = linear_modules(lm)
    # tiny Llama: 2 layers x (q, k, v, o, gate, up, down); not the LM head
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert resolve_targets(lm, ("q_proj", "v_proj")) == [n for n in names if n.endswith(("q_proj", "v_proj"))]
    with pytest.raises(ValueError, match="c_attn matches no linear module.*its linear modules are down_proj, gate_proj"):
        resolve_targets(lm, ("q_proj", "c_attn"))


def test_only_adapters_and_value_head_train(tiny_policy_path, rollouts):
    learner = lora_learner(tiny_policy_path)
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert trainable and all(_is_adapter(n) or n.startswith("value_head.") for n in trainable)
    assert {"value_head.weight", "value_head.bias"} <= trainable
    # AdamW holds exactly those parameters
    in_optim = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert in_optim == {id(p) for n, p in learner.model.named_parameters() if n in trainable}
    # one micro-step: gradients on adapters (B's; A's are 0 while B = 0) and the value head, none elsewhere
    prep, _ = learner.prepare(collate(rollouts, learner.pad_id))
    real = prep.batch.response_mask.sum()
    learner._micro_step(prep, torch.arange(len(prep.batch)), len(prep.batch), real)
    grads = {n: p.grad for n, p in learner.model.named_parameters() if p.grad is not None}
    assert set(grads) <= trainable
    assert all(grads[n].abs().sum() > 0 for n in grads if ".lora_B." in n or n.startswith("value_head."))
    assert sum(".lora_B." in n for n in grads) == 14


def test_reference_is_the_base_model_without_a_copy(tiny_policy_path, rollouts, base_reference):
    learner = lora_learner(tiny_policy_path)
    assert isinstance(learner.reference, AdapterOffReference)
    assert list(learner.reference.parameters()) == []  # no second copy of the weights
    b = collate(rollouts, learner.pad_id)
    learner.step(rollouts)  # the adapters move
    with torch.no_grad():
        ref = learner.reference(*b.inputs())
        base = base_reference(*b.inputs())
        policy = learner.model(*b.inputs(), with_values=False, with_entropy=False).logprobs
    torch.testing.assert_close(ref, base, atol=0, rtol=0)
    mask = b.response_mask.bool()
    assert (policy - base)[mask].abs().max() > 1e-4  # the adapted policy moved away from it


def test_first_ratio_is_one(tiny_policy_path, rollouts):
    """pi_old is recomputed by the same adapted model: ratio exp(0) = 1 on every token, so nothing
    is clipped and approx_kl is 0 on the first minibatch (one minibatch, one epoch)."""
    learner = lora_learner(tiny_policy_path, ppo=PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8))
    prep, _ = learner.prepare(collate(rollouts, learner.pad_id))
    stats = learner.update(prep)
    assert stats["clipfrac"] == 0.0 and abs(stats["approx_kl"]) < 1e-7
    assert abs(stats["ratio_max"] - 1.0) < 1e-6


def test_a_step_changes_only_adapters_and_value_head(tiny_policy_path, rollouts):
    learner = lora_learner(tiny_policy_path)
    before = {n: t.clone() for n, t in learner.model.state_dict().items()}
    learner.step(rollouts)
    after = learner.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(_is_adapter(n) or n.startswith("value_head.") for n in changed)
    assert any(".lora_B." in n for n in changed)


def test_merged_export_is_the_adapted_model_under_base_names(tiny_policy_path, rollouts):
    learner = lora_learner(tiny_policy_path)
    learner.step(rollouts)
    merged = learner.hf_state_dict()
    base = load_causal_lm(str(tiny_policy_path), "cpu")
    assert set(merged) == set(base.state_dict())  # no base_model.model. / .base_layer / lora_ keys
    # W' = W + (alpha / r) B A for one layer, by hand
    layer = learner.model.lm.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base.model.layers[0].self_attn.q_proj.weight + (16.0 / 8) * b @ a
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=0)
    # the base model loaded with the merged weights computes the adapted policy's log-probs
    base.load_state_dict(merged)
    bt = collate(rollouts, learner.pad_id)
    with torch.no_grad():
        want = learner.model(*bt.inputs(), with_values=False, with_entropy=False).logprobs
        got = ReferenceModel(base)(*bt.inputs())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dropout_makes_the_first_ratio_differ(tiny_policy_path, rollouts):
    """lora.dropout acts in the update only (pi_old is computed without it)."""
    learner = lora_learner(tiny_policy_path, dropout=0.5, ppo=PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8))
    learner.step(rollouts)  # B != 0 now: dropout on A's input changes the output
    prep, _ = learner.prepare(collate(rollouts, learner.pad_id))
    assert abs(learner.update(prep)["approx_kl"]) > 1e-9


def test_checkpoint_round_trip_restores_adapters_and_optimizer(tiny_policy_path, rollouts, tmp_path):
    a = lora_learner(tiny_policy_path)
    a.step(rollouts)
    a.save_state(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    b = lora_learner(tiny_policy_path, seed=7)
    b.load_state(tmp_path)
    assert b.version == a.version
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[n], sb[n]) for n in sa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][k][key], ob["state"][k][key])
    # the optimizer state is the adapters' and the value head's only: small
    optim_params = sum(p.numel() for g in a.optimizer.param_groups for p in g["params"])
    assert optim_params < 0.05 * sum(p.numel() for p in a.model.parameters())
    # the next step continues identically
    again = dataclasses.replace(rollouts, policy_version=np.ones_like(rollouts.policy_version))
    sa1, sb1 = a.step(again), b.step(again)
    assert sa1.to_dict()["policy_loss"] == sb1.to_dict()["policy_loss"]
    torch.testing.assert_close(a.hf_state_dict(), b.hf_state_dict(), atol=0, rtol=0)


def test_exports_from_a_gathered_state_equal_the_modules_own(tiny_policy_path, rollouts):
    """Under FSDP2 the merged weights and the adapters come from the LM's full state dict (gathered by
    every rank) instead of its modules: the same tensors; lm_keys maps the adapters back for a load."""
    learner = lora_learner(tiny_policy_path)
    learner.step(rollouts)
    a = learner.adapters
    full = {k: v.clone() for k, v in a.lm.state_dict().items()}
    own, gathered = a.merged_state(), a.merged_state(full)
    assert set(own) == set(gathered) and all(torch.equal(own[k], gathered[k]) for k in own)
    own, gathered = a.adapter_state(), a.adapter_state(full)
    assert set(own) == set(gathered) and len(own) == 28 and all(torch.equal(own[k], gathered[k]) for k in own)
    back = a.lm_keys(own)
    assert set(back) == {k for k in full if ".lora_" in k} and all(torch.equal(back[k], full[k]) for k in back)


def test_lora_with_fsdp_refuses_adapter_sync_only():
    from ray_rlhf.config import load_config

    base = ["lora.rank=8", "learner.num=2", "learner.strategy=fsdp", "learner.num_cpus=0.25"]
    assert load_config("tiny", base).lora.resolved_sync == "merged"
    from ray_rlhf.errors import UserError

    with pytest.raises(UserError, match="lora.sync=adapter with learner.strategy=fsdp is not supported yet"):
        load_config("tiny", [*base, "lora.sync=adapter"])


@pytest.mark.slow
def test_compiled_lora_gives_the_eager_gradient(tiny_policy_path, rollouts):
    """learner.compile=true on a peft model: each decoder layer, its LoRA layers inside, compiled by
    torch.compile (inductor). One micro-step on the same prepared batch (prepared eagerly, so only the
    training graph compiles: ~1 min on 2 busy cores): loss record and gradients as eager ones within 1e-5
    (relative, per tensor; 9.7e-7 seen). Not bit-equal: inductor fuses the layer's ops and reorders
    their float32 sums (norms, softmax, the matmuls' epilogues), a rounding difference per op of
    ~1e-7 that the backward through 2 layers carries on (after two whole steps, compile vs eager:
    gradients 1.5e-5, merged weights 1.2e-5 -- AdamW's first step amplifies, see test_learner_group)."""
    eager = lora_learner(tiny_policy_path)
    spec = LoraSpec(rank=8, alpha=16.0)
    compiled = Learner(str(tiny_policy_path), PPO, KLConfig(), seed=0, options=LearnerOptions(lora=spec, compile=True))
    prep, _ = eager.prepare(collate(rollouts, eager.pad_id))
    real, rows = prep.batch.response_mask.sum(), torch.arange(len(prep.batch))
    stats = [ln._micro_step(prep, rows, len(prep.batch), real).to_dict() for ln in (eager, compiled)]
    assert abs(stats[0]["value_loss"] - stats[1]["value_loss"]) <= 1e-5 * abs(stats[0]["value_loss"])
    assert abs(stats[0]["policy_loss"] - stats[1]["policy_loss"]) <= 1e-6  # terms of size 1, sum near 0
    grads = [{n: p.grad for n, p in ln.model.named_parameters() if p.grad is not None} for ln in (eager, compiled)]
    assert set(grads[0]) == set(grads[1]) and sum(".lora_B." in n for n in grads[0]) == 14
    worst = max(float((grads[1][n] - g).norm() / g.norm()) for n, g in grads[0].items() if g.norm() > 0)
    print(f"\ncompiled vs eager LoRA gradient: worst relative difference {worst:.2e}")
    assert worst < 1e-5
