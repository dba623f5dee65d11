"""``rollout.partial``: a weight load forced mid-generation on the real in-process vLLM engine (CPU), no Ray.

The engine's ``step`` is wrapped so that new weights are delivered to the generator's mailbox
after ``SWITCH_AFTER`` engine steps, as a concurrent actor call would. Checked: every sequence's
tokens carry version 0 up to the switch and version 1 after it; each token's behaviour log-prob
equals the log-prob that Hugging Face transformers computes for it under the weights of its own
version (so the resumed requests were re-prefilled under the new weights: no stale KV); the
(prompt, sample) keys out are exactly the ones in; a delivery whose checksum does not match what
the engine loaded raises :class:`WeightSyncError`.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec
from ray_rlhf.sync.checksum import state_dict_checksum
from ray_rlhf.sync.types import WeightSyncError
from tests.batches import sequences

pytestmark = pytest.mark.integration

PROMPTS = ("The cat sat on", "Once upon a time", "Water is")
SWITCH_AFTER = 4
"""Engine steps before the delivery: the prefill samples each sequence's first token, so 4 tokens of version 0."""


@pytest.fixture(scope="module")
def hf(tiny_policy_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_policy_path)


@pytest.fixture(scope="module")
def gen(tiny_policy_path):
    from ray_rlhf.generation.generator import Generator

    g = Generator(tiny_policy_path, "gen-partial", max_model_len=96, seed=0, kv_cache_gib=1, partial=True)
    yield g
    g.shutdown()


def hf_logprobs(model, prompt_ids, response_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def deliver_after(monkeypatch, gen, steps: int, version: int, state, checksum) -> None:
    """Deliver ``state`` to ``gen``'s mailbox once its engine has taken ``steps`` more steps."""
    engine = gen._llm.llm_engine
    real_step, count = engine.step, [0]

    def step():
        outs = real_step()
        count[0] += 1
        if count[0] == steps:
            gen.weights.deliver(version, state, checksum)
        return outs

    monkeypatch.setattr(engine, "step", step)


def test_a_weight_load_mid_generation_switches_versions_and_behaviour_logprobs(gen, hf, monkeypatch):
    model, tok = hf
    torch.manual_seed(0)
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    new_model = copy.deepcopy(model)
    new_model.load_state_dict(new_state)
    items = tuple(PromptItem(i, t, tuple(tok(t).input_ids)) for i, t in enumerate(PROMPTS))
    spec = SamplingSpec(n=2, max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True)  # every one runs past the switch
    deliver_after(monkeypatch, gen, SWITCH_AFTER, 1, new_state, state_dict_checksum(new_state))
    report, batch = gen.generate(PromptShard(0, items), spec)

    assert gen.version == 1 and gen.interruptions == 1
    assert Counter(batch.keys()) == Counter((i, j) for i in range(len(PROMPTS)) for j in range(2))
    assert report.sequences == len(batch) == 6 and report.tokens == len(batch.response_ids)
    assert (batch.policy_version == 0).all() and batch.interrupted.all()
    offsets = batch.response_offsets
    moved = 0.0
    for i, r in enumerate(sequences(batch)):
        versions = batch.token_versions[offsets[i] : offsets[i + 1]].tolist()
        assert versions == [0] * SWITCH_AFTER + [1] * (12 - SWITCH_AFTER), (r.key, versions)
        assert r.finish_reason == "length" and len(r.response_ids) == 12
        assert r.response == tok.decode(r.response_ids, skip_special_tokens=True)
        behaviour = torch.tensor(r.sampler_logprobs)
        old_lp = hf_logprobs(model, r.prompt_ids, r.response_ids)
        new_lp = hf_logprobs(new_model, r.prompt_ids, r.response_ids)
        # each token under the weights that sampled it (fp32; vLLM CPU vs transformers, as test_generator)
        torch.testing.assert_close(behaviour[:SWITCH_AFTER], old_lp[:SWITCH_AFTER], atol=2e-3, rtol=0)
        torch.testing.assert_close(behaviour[SWITCH_AFTER:], new_lp[SWITCH_AFTER:], atol=2e-3, rtol=0)
        moved = max(moved, float((old_lp[SWITCH_AFTER:] - new_lp[SWITCH_AFTER:]).abs().max()))
    assert moved > 0.05, moved  # the two versions' log-probs really differ: the check above can tell them apart


def test_a_delivery_that_does_not_verify_raises_weight_sync_error(gen, hf, monkeypatch):
    model, tok = hf
    state = {k: v.clone() for k, v in model.state_dict().items()}
    items = (PromptItem(0, PROMPTS[0], tuple(tok(PROMPTS[0]).input_ids)),)
    deliver_after(monkeypatch, gen, 2, gen.version + 1, state, "not-the-learner-checksum")
    with pytest.raises(WeightSyncError, match="received weights with checksum"):
        gen.generate(PromptShard(0, items), SamplingSpec(n=1, max_new_tokens=8, seed=1, ignore_eos=True))
