"""The Generator with a real in-process vLLM (CPU) engine on the tiny random Llama, no Ray.

One engine for the whole module (start-up ~10 s). Tests run in file order; each states the
weights it needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec
from ray_rlhf.sync.broadcaster import compare_checksums
from ray_rlhf.sync.checksum import state_dict_checksum
from ray_rlhf.sync.types import WeightSyncError
from tests.batches import sequences

pytestmark = pytest.mark.integration

PROMPTS = ("The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog")
EOS_LOGIT_SCALE = 0.27
"""With this, p(EOS) is ~9% per token under :func:`eos_friendly` (measured with HF on the tiny
model): 16-token responses then end both ways, by EOS and by length."""


@pytest.fixture(scope="module")
def model_dir(tiny_policy_path) -> Path:
    return Path(tiny_policy_path)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def gen(model_dir):
    from ray_rlhf.generation.generator import Generator

    g = Generator(model_dir, "gen-test", max_model_len=96, seed=0, kv_cache_gib=1)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def shard(tok, *texts, start=0):
    items = tuple(PromptItem(start + i, t, tuple(tok(t).input_ids)) for i, t in enumerate(texts))
    return PromptShard(0, items)


def generate(gen, shard, spec):
    """The generator's sequences (the report checked on the way)."""
    report, batch = gen.generate(shard, spec)
    assert report.sequences == len(batch) and report.tokens == len(batch.response_ids)
    assert report.generator_id == gen.generator_id and report.version == gen.version
    return sequences(batch)


def verify(checksum, gen, version):
    compare_checksums(version, checksum, [gen.weights.status()], [gen.weights.engine_checksum()])


def eos_friendly(state: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """Same model, perturbed so that EOS is likely at every step.

    Residual dimension 0 is set to 5.0 in every token embedding and no layer writes to it, so it
    dominates the final RMS-normed hidden state; only the EOS row of the LM head reads it.
    """
    s = {k: v.clone() for k, v in state.items()}
    s["model.embed_tokens.weight"][:, 0] = 5.0
    for k in s:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            s[k][0, :] = 0
    s["lm_head.weight"][:, 0] = 0
    s["lm_head.weight"][eos_id, 0] = EOS_LOGIT_SCALE
    return s


def hf_logprobs(model, prompt_ids, response_ids, temperature=1.0) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def test_samples_ids_and_sampler_logprobs_match_hf(gen, hf):
    model, tok = hf
    spec = SamplingSpec(n=3, max_new_tokens=12, temperature=1.0, seed=11)
    out = generate(gen, shard(tok, *PROMPTS[:2]), spec)
    assert [r.key for r in out] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for r in out:
        # Prompt ids are HF's tokenization, BOS included once.
        assert r.prompt_ids == tok(r.prompt).input_ids and r.prompt_ids[0] == tok.bos_token_id
        assert r.prompt_ids.count(tok.bos_token_id) == 1
        assert len(r.sampler_logprobs) == len(r.response_ids) > 0
        assert r.finish_reason in ("stop", "length")
        assert r.policy_version == 0 and r.generator_id == "gen-test"
        ref = hf_logprobs(model, r.prompt_ids, r.response_ids)
        torch.testing.assert_close(torch.tensor(r.sampler_logprobs), ref, atol=2e-3, rtol=0)
    # n samples of one prompt are different draws.
    assert len({tuple(r.response_ids) for r in out[:3]}) == 3
    # processed logprobs: under temperature T, the log-prob of the tempered distribution.
    hot = generate(gen, shard(tok, PROMPTS[0]), SamplingSpec(n=1, max_new_tokens=8, temperature=0.6, seed=3))[0]
    ref = hf_logprobs(model, hot.prompt_ids, hot.response_ids, temperature=0.6)
    torch.testing.assert_close(torch.tensor(hot.sampler_logprobs), ref, atol=2e-3, rtol=0)


def test_seeded_generation_is_reproducible(gen, tok):
    spec = SamplingSpec(n=2, max_new_tokens=10, seed=5)
    a = generate(gen, shard(tok, *PROMPTS[:3]), spec)
    b = generate(gen, shard(tok, *PROMPTS[:3]), spec)
    assert [(r.response_ids, r.sampler_logprobs) for r in a] == [(r.response_ids, r.sampler_logprobs) for r in b]
    c = generate(gen, shard(tok, *PROMPTS[:3]), SamplingSpec(n=2, max_new_tokens=10, seed=6))
    assert [r.response_ids for r in a] != [r.response_ids for r in c]
    # A prompt's samples depend on its dataset index, not on the shard it travels in.
    alone = generate(gen, shard(tok, PROMPTS[1], start=1), spec)
    assert [r.response_ids for r in alone] == [r.response_ids for r in a if r.prompt_index == 1]


def test_new_weights_change_outputs_vary_lengths_and_bump_version(gen, hf):
    model, tok = hf
    spec = SamplingSpec(n=4, max_new_tokens=16, seed=21)
    before = generate(gen, shard(tok, *PROMPTS), spec)
    state = eos_friendly(model.state_dict(), tok.eos_token_id)
    report = gen.weights.load(1, state)
    assert report.version == 1 and gen.version == 1
    assert report.bytes == sum(t.numel() * 4 for t in state.values())
    assert report.received_checksum == state_dict_checksum(state)
    verify(state_dict_checksum(state), gen, 1)  # the engine holds exactly what was sent

    after = generate(gen, shard(tok, *PROMPTS), spec)
    assert [r.response_ids for r in after] != [r.response_ids for r in before]
    assert {r.policy_version for r in after} == {1}
    reasons = {r.finish_reason for r in after}
    assert reasons == {"stop", "length"}, reasons
    for r in after:
        if r.finish_reason == "stop":  # EOS kept as the last response token
            assert r.response_ids[-1] == tok.eos_token_id and len(r.response_ids) <= 16
        else:
            assert len(r.response_ids) == 16 and tok.eos_token_id not in r.response_ids
    assert len({len(r.response_ids) for r in after}) > 2
    # Sampler log-probs follow the NEW weights (prefix cache dropped on load).
    r = after[0]
    model.load_state_dict(state)
    torch.testing.assert_close(
        torch.tensor(r.sampler_logprobs), hf_logprobs(model, r.prompt_ids, r.response_ids), atol=2e-3, rtol=0
    )


def test_checksum_verify_fails_after_a_corrupted_or_partial_load(gen, hf):
    model, tok = hf
    learner = eos_friendly(model.state_dict(), tok.eos_token_id)
    learner["model.layers.1.mlp.up_proj.weight"] += 0.01  # version 2 is a real update
    want = state_dict_checksum(learner)

    # 1. One element corrupted on the way: the engine loads it, verify catches it.
    sent = {k: v.clone() for k, v in learner.items()}
    sent["model.layers.1.self_attn.k_proj.weight"][3, 7] += 1e-3
    report = gen.weights.load(2, sent)
    assert report.received_checksum != want  # the generator can tell it was the transport
    with pytest.raises(WeightSyncError, match=f"generator gen-test received weights with checksum .* != learner checksum {want}"):
        verify(want, gen, 2)

    # 2. A tensor missing from the payload: refused before the engine is touched.
    partial = {k: v for k, v in learner.items() if k != "model.layers.0.mlp.down_proj.weight"}
    with pytest.raises(WeightSyncError, match="missing .*model.layers.0.mlp.down_proj.weight"):
        gen.weights.load(3, partial)
    assert gen.version == 2

    # 3. The engine itself loading only part of a fused layer (v_proj missing from qkv_proj):
    #    vLLM leaves uninitialised rows there without an error; the engine read-back sees it.
    gen.weights.load(2, learner)
    verify(want, gen, 2)
    no_v = [(k, v) for k, v in learner.items() if k != "model.layers.1.self_attn.v_proj.weight"]
    gen.weights.engine.reload(no_v)  # straight into the engine, past the receiver's check
    assert gen.weights.engine_checksum().checksum != want

    # A good load repairs it.
    gen.weights.load(2, learner)
    assert gen.weights.engine_checksum().checksum == want


def test_info_and_ping(gen):
    info = gen.info()
    assert info["generator_id"] == "gen-test" == gen.ping()
    assert info["peak_rss_bytes"] >= info["rss_bytes"] > 0 and info["pid"] > 0
    assert info["version"] == gen.version == gen.weights.status().version


def test_rotating_read_back_covers_every_tensor_and_still_catches_corruption(gen, hf):
    """``sync.verify_parts``: the packed layers are read back in rotating parts; together the parts
    cover every tensor, a layer the engine got wrong is caught in the part that reads it, and a
    tensor corrupted on the way is caught at once by the received-tensor checksum."""
    model, _ = hf
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen.weights.load(7, state)
    full = gen.weights.engine_checksum()
    parts = [gen.weights.engine_checksum(p, 4) for p in range(4)]
    assert set().union(*(p.names for p in parts)) == set(full.names)
    assert all(len(p.names) < len(full.names) and not p.mismatched for p in parts)
    for p in parts:
        assert p.checksum == state_dict_checksum(state, p.names)
        compare_checksums(7, state_dict_checksum(state), [gen.weights.status()], [p])
    bad = {k: v.clone() for k, v in state.items()}
    bad["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.5
    gen.weights.engine.reload(list(bad.items()))  # the engine computes with a wrong layer
    checks = [gen.weights.engine_checksum(p, 4) for p in range(4)]
    assert [c.mismatched for c in checks if c.mismatched] == [("model.layers.1.mlp.down_proj.weight",)]
    with pytest.raises(WeightSyncError, match="engine computes with 1 tensor.*down_proj.*the engine load failed"):
        for c in checks:
            compare_checksums(7, state_dict_checksum(state), [gen.weights.status()], [c])
    gen.weights.load(8, bad)  # a tensor changed on the way: the received checksum tells at once
    with pytest.raises(WeightSyncError, match="received weights with checksum .* the transport corrupted"):
        compare_checksums(8, state_dict_checksum(state), [gen.weights.status()], [gen.weights.engine_checksum(0, 4)])
    gen.weights.load(8, state)
    verify(state_dict_checksum(state), gen, 8)


def test_rotating_read_back_samples_every_other_packed_layer_each_sync(gen, hf):
    """``sync.verify_parts > 1``: a part reads the packed layers of its turn in full and one sampled
    input feature of every other one, so a layer the engine did not reload (it still computes with
    the previous version's) fails the very next sync, whichever part's turn it is."""
    model, _ = hf
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen.weights.load(11, state)
    full = set(gen.weights.engine_checksum().names)
    checks = [gen.weights.engine_checksum(p, 4) for p in range(4)]
    assert all(not c.mismatched and c.sampled for c in checks)
    assert all(set(c.names) | set(c.sampled) == full for c in checks)
    # Only the head is both: its parameter (the embedding lookup's) in full, its packed copy (the logits') sampled.
    assert all(set(c.names) & set(c.sampled) <= {"lm_head.weight"} for c in checks)
    layer = "model.layers.1.mlp.down_proj.weight"
    assert sum(layer in c.sampled for c in checks) == 3  # sampled in the three parts that do not read it in full
    new = {k: v.clone() for k, v in state.items()}
    new[layer] += 0.01
    gen.weights.load(12, new)  # received: version 12; then the engine is put back on version 11's weights
    gen.weights.engine.reload(list(state.items()))
    checks = [gen.weights.engine_checksum(p, 4) for p in range(4)]
    assert [c.mismatched for c in checks] == [(layer,)] * 4
    for c in checks:
        with pytest.raises(WeightSyncError, match="engine computes with 1 tensor.*down_proj.*the engine load failed"):
            compare_checksums(12, state_dict_checksum(new), [gen.weights.status()], [c])
    gen.weights.load(12, new)
    assert not any(gen.weights.engine_checksum(p, 4).mismatched for p in range(4))


def test_truncated_marks_samples_cut_off_at_max_new_tokens(gen, hf):
    """``truncated`` is vLLM's finish reason "length": the response has exactly ``max_new_tokens``
    tokens and no EOS; a response that ends on EOS is never truncated. The learner's tensors carry it."""
    from ray_rlhf.learning.batch import collate

    model, tok = hf
    eos = tok.eos_token_id
    # 1. The random model rarely samples EOS (~1/vocab per token): with 2 new tokens nearly every
    #    sample is cut off.
    gen.weights.load(9, {k: v.clone() for k, v in model.state_dict().items()})
    _, short = gen.generate(shard(tok, *PROMPTS), SamplingSpec(n=4, max_new_tokens=2, seed=31))
    assert len(short) == 16 and short.truncated.mean() >= 0.9, short.finish_reason
    for r in sequences(short):
        assert r.truncated == (r.finish_reason == "length") == (eos not in r.response_ids)
        assert (len(r.response_ids) == 2) if r.truncated else (r.response_ids[-1] == eos)
    # 2. EOS likely at every step (~9%): 16-token responses end both ways.
    gen.weights.load(10, eos_friendly(model.state_dict(), eos))
    _, mixed = gen.generate(shard(tok, *PROMPTS), SamplingSpec(n=4, max_new_tokens=16, seed=21))
    assert 0 < mixed.truncated.sum() < len(mixed), mixed.finish_reason
    for r in sequences(mixed):
        if r.response_ids[-1] == eos:
            assert not r.truncated and r.finish_reason == "stop"
        else:
            assert r.truncated and len(r.response_ids) == 16 and eos not in r.response_ids
    t = collate(mixed.with_rewards(mixed.response_lengths.astype(float), {}), pad_id=tok.pad_token_id)
    assert t.truncated.dtype == torch.bool and t.truncated.tolist() == mixed.truncated.tolist()
    assert (t.response_mask.sum(1)[t.truncated] == 16).all()


def test_ignore_eos_samples_past_eos_to_max_new_tokens(gen, hf):
    """``rollout.ignore_eos``: with weights that make EOS likely at every step, every response is
    still exactly ``max_new_tokens`` long, finishes with reason ``length``, carries EOS inside it, and
    has one behaviour log-prob per token; without it the same weights end responses at EOS."""
    model, tok = hf
    eos = tok.eos_token_id
    gen.weights.load(11, eos_friendly(model.state_dict(), eos))
    _, fixed = gen.generate(shard(tok, *PROMPTS), SamplingSpec(n=4, max_new_tokens=16, seed=21, ignore_eos=True))
    assert (fixed.response_lengths == 16).all() and set(fixed.finish_reason) == {"length"}
    assert any(eos in r.response_ids[:-1] for r in sequences(fixed))  # sampled EOS, went on
    assert all(len(r.sampler_logprobs) == 16 for r in sequences(fixed))
    _, free = gen.generate(shard(tok, *PROMPTS), SamplingSpec(n=4, max_new_tokens=16, seed=21))
    assert (free.response_lengths < 16).any() and "stop" in set(free.finish_reason)
