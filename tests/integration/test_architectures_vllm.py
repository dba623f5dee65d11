"""The architecture matrix in a real in-process vLLM (CPU) engine, one engine at a time.

For every architecture of :mod:`tests.architectures`, before any update:
(a) greedy and seeded generation, chat template included; (b) the sampler's processed log-probs
of the sampled tokens equal the learner's (``output_logits`` on the HF model) at T = 1.0 and 0.7;
(c) the engine read-back equals the HF state dict tensor by tensor (checksum included); then
(d) weight updates with ``reload_weights``: what the plain call gets wrong for tied heads, and that
:func:`~ray_rlhf.generation.vllm_engine.reload_hf_weights` lands the exact perturbed weights and the
sampler follows them.

Measured log-prob differences are printed at the end of the module (``pytest -s``) and recorded
as test properties. An architecture the CPU build cannot load is skipped with vLLM's error.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ray_rlhf.models.output_head import attention_implementation, output_logits, trunk_hidden
from ray_rlhf.models.output_head import tied_parameter_groups as _tied_groups
from ray_rlhf.models.policy import sequence_inputs
from ray_rlhf.sync.checksum import state_dict_checksum
from tests.architectures import ARCHITECTURES, build_arch, get_spec

pytestmark = pytest.mark.integration

TIED = {n for n in ARCHITECTURES if get_spec(n).config.get("tie_word_embeddings")}
EMBEDDING_IS_HEAD = {"gemma2", "cohere"}
"""vLLM computes these models' logits with the input embedding module itself (no ``lm_head``)."""

MAX_NEW = 24  # prompts of 5-30 tokens + 24 cross the 16-token sliding window of Gemma/Mistral
MEAN_TOL = 1e-4
TEXTS = ["The cat sat on the", "Water is", "Once upon a time, a small fox"]
MESSAGES = [[{"role": "user", "content": "Where do fish live?"}], [{"role": "user", "content": "Say hello."}]]
RESULTS: dict[str, dict[str, float]] = {}


def _load_hf(path):
    from transformers import AutoConfig, AutoModelForCausalLM

    impl = attention_implementation(AutoConfig.from_pretrained(path))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if RESULTS:
        print("\narchitecture matrix, sampler vs learner log-probs (mean / max abs diff):")
        for name, r in RESULTS.items():
            print(f"  {name:11s} " + "  ".join(f"{k}={v:.2e}" for k, v in sorted(r.items())))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory):
    """One architecture: its directory, tokenizer, HF model and a vLLM engine (or the load error)."""
    from transformers import AutoTokenizer

    name = request.param
    path = build_arch(name, tmp_path_factory.mktemp("archs") / name, seed=0)
    pytest.importorskip("vllm")
    from ray_rlhf.generation.generator import Generator

    ns = SimpleNamespace(name=name, path=path, tok=AutoTokenizer.from_pretrained(path), hf=_load_hf(path), llm=None,
                         gen=None, error=None)
    try:  # the project's Generator: the engine settings of a run (in-process, fp32, processed logprobs)
        ns.gen = Generator(path, f"gen-{name}", max_model_len=256, seed=0)
        ns.llm = ns.gen._llm
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        ns.error = f"{type(e).__name__}: {e}"
    yield ns
    if ns.gen is not None:
        ns.gen.shutdown()
        ns.gen = ns.llm = None


@pytest.fixture
def llm(arch):
    if arch.llm is None:
        pytest.skip(f"vLLM CPU cannot run {arch.name}: {arch.error}")
    return arch.llm


def _prompts(tok) -> list[list[int]]:
    """Plain texts (tokenized as the Generator does) and chat-templated conversations."""
    ids = [list(x) for x in tok(TEXTS, add_special_tokens=True)["input_ids"]]
    for m in MESSAGES:
        text = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    return ids


def _sample(llm, prompts, **kw):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(**kw), use_tqdm=False)
    return [sorted(o.outputs, key=lambda c: c.index) for o in outs]


def _batch(prompts, responses, pad_id):
    """Left-padded prompts, right-padded responses (the learner's layout). Shapes (B, P), (B, T)."""
    P, T = max(map(len, prompts)), max(map(len, responses))
    pi = torch.full((len(prompts), P), pad_id)
    pm = torch.zeros(len(prompts), P, dtype=torch.long)
    ri = torch.full((len(prompts), T), pad_id)
    rm = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        pi[i, P - len(p) :], pm[i, P - len(p) :] = torch.tensor(p), 1
        ri[i, : len(r)], rm[i, : len(r)] = torch.tensor(r, dtype=torch.long), 1
    return pi, pm, ri, rm


@torch.no_grad()
def _learner_logprobs(lm, prompts, responses, pad_id, temperature):
    """log_softmax(output_logits(trunk) / T) of each response token. Returns (B, T) and the mask."""
    pi, pm, ri, rm = _batch(prompts, responses, pad_id)
    ids, mask, pos = sequence_inputs(pi, pm, ri, rm)
    P, T = pi.shape[1], ri.shape[1]
    logits = output_logits(lm, trunk_hidden(lm, ids, mask, pos)[:, P - 1 : P + T - 1]) / temperature
    return logits.log_softmax(-1).gather(-1, ri[..., None]).squeeze(-1), rm.bool()


def _sampler_vs_learner(llm, lm, tok, temperature, seed):
    prompts = _prompts(tok)
    outs = _sample(llm, prompts, n=2, max_tokens=MAX_NEW, temperature=temperature, seed=seed, logprobs=0)
    ps, rs, lps = [], [], []
    for p, samples in zip(prompts, outs):
        for c in samples:
            ps.append(p)
            rs.append(list(c.token_ids))
            lps.append([float(c.logprobs[t][tok_id].logprob) for t, tok_id in enumerate(c.token_ids)])
    ours, mask = _learner_logprobs(lm, ps, rs, tok.pad_token_id, temperature)
    theirs = torch.zeros_like(ours)
    for i, lp in enumerate(lps):
        theirs[i, : len(lp)] = torch.tensor(lp)
    diff = (ours - theirs)[mask].abs()
    return diff.mean().item(), diff.max().item(), int(mask.sum())


def _perturbed_state(lm, seed, scale=0.02) -> dict[str, torch.Tensor]:
    """Add noise to every parameter of ``lm`` (a tied pair moves together: it is one tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


def _readback(llm):
    from ray_rlhf.generation.vllm_engine import engine_hf_state_dict

    return llm.collective_rpc(engine_hf_state_dict)[0]


# ---------------------------------------------------------------------------- (a) generation


def test_greedy_and_seeded_generation(arch, llm):
    prompts = _prompts(arch.tok)
    greedy = _sample(llm, prompts, max_tokens=MAX_NEW, temperature=0.0)
    assert greedy == _sample(llm, prompts, max_tokens=MAX_NEW, temperature=0.0)
    a = _sample(llm, prompts, n=2, max_tokens=MAX_NEW, temperature=1.0, seed=7)
    b = _sample(llm, prompts, n=2, max_tokens=MAX_NEW, temperature=1.0, seed=7)
    assert [[c.token_ids for c in s] for s in a] == [[c.token_ids for c in s] for s in b]
    # Every greedy token is the HF model's argmax (up to near-ties).
    resp = [list(s[0].token_ids) for s in greedy]
    assert all(0 < len(r) <= MAX_NEW and max(r) < len(arch.tok) for r in resp)
    pi, pm, ri, rm = _batch(prompts, resp, arch.tok.pad_token_id)
    ids, mask, pos = sequence_inputs(pi, pm, ri, rm)
    P, T = pi.shape[1], ri.shape[1]
    with torch.no_grad():
        logits = output_logits(arch.hf, trunk_hidden(arch.hf, ids, mask, pos)[:, P - 1 : P + T - 1])
    chosen = logits.gather(-1, ri[..., None]).squeeze(-1)
    gap = (logits.max(-1).values - chosen)[rm.bool()]
    assert gap.max() <= 1e-4, f"vLLM greedy picked a token {gap.max():.3g} below the HF argmax"


def test_chat_through_the_engine_uses_the_template(arch, llm):
    from vllm import SamplingParams

    out = llm.chat(MESSAGES[0], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0]
    expected = arch.tok.apply_chat_template(MESSAGES[0], add_generation_prompt=True, tokenize=False)
    assert list(out.prompt_token_ids) == arch.tok(expected, add_special_tokens=False)["input_ids"]  # one BOS at most
    assert len(out.outputs[0].token_ids) > 0


# ------------------------------------------------------------- (b) sampler vs learner logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_the_learner(arch, llm, temperature, record_property):
    mean, mx, n = _sampler_vs_learner(llm, arch.hf, arch.tok, temperature, seed=11)
    RESULTS.setdefault(arch.name, {})[f"T{temperature}_mean"] = mean
    RESULTS[arch.name][f"T{temperature}_max"] = mx
    record_property(f"{arch.name}_T{temperature}", {"mean": mean, "max": mx, "tokens": n})
    assert n > 50
    if attention_implementation(arch.hf.config) is not None:  # what a learner on HF's default gets
        from transformers import AutoModelForCausalLM

        sdpa = AutoModelForCausalLM.from_pretrained(arch.path, dtype=torch.float32, attn_implementation="sdpa").eval()
        RESULTS[arch.name][f"T{temperature}_mean_hf_sdpa"] = _sampler_vs_learner(llm, sdpa, arch.tok, temperature, 11)[0]
    assert mean <= MEAN_TOL, f"{arch.name} T={temperature}: mean |diff| {mean:.3g}, max {mx:.3g} over {n} tokens"


# ------------------------------------------------------------------------- (c) read-back


def test_readback_is_the_hf_state_dict(arch, llm):
    hf_state = arch.hf.state_dict()
    engine = _readback(llm)
    assert sorted(engine) == sorted(hf_state)
    for k, v in hf_state.items():
        assert engine[k].shape == v.shape and engine[k].dtype == v.dtype, k
        assert torch.equal(engine[k], v), k
    assert state_dict_checksum(engine) == state_dict_checksum(hf_state)
    if arch.name in TIED:
        assert "lm_head.weight" in engine
    if arch.name == "gpt2":  # Conv1D: (in, out), as HF stores it
        assert tuple(engine["transformer.h.0.attn.c_attn.weight"].shape) == (128, 3 * 128)
        assert tuple(engine["transformer.h.0.mlp.c_fc.weight"].shape) == (128, 256)


# -------------------------------------------------------------------------- (d) updates


def test_plain_reload_of_checkpoint_form_leaves_a_tied_head_stale(arch, llm):
    """vLLM 0.32 CPU: a payload WITHOUT ``lm_head.weight`` (as a tied checkpoint stores it)
    reloads the embedding but the LM head's packed copy keeps the old matrix; the read-back
    (which probes the packed copy) must report exactly that. If this starts failing because
    nothing is stale, vLLM fixed it and ``refresh_logits_head`` can go."""
    lm = _load_hf(arch.path)
    sent = _perturbed_state(lm, seed=1)
    payload = [(k, v) for k, v in sent.items() if not (arch.name in TIED and k == "lm_head.weight")]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": payload})
    engine = _readback(llm)
    differ = sorted(k for k in sent if not torch.equal(engine[k], sent[k]))
    expected = ["lm_head.weight"] if arch.name in TIED - EMBEDDING_IS_HEAD else []
    assert differ == expected
    assert (state_dict_checksum(engine) == state_dict_checksum(sent)) == (not expected)
    # Not only the probe: the sampler's log-probs are those of the stale head.
    llm.reset_prefix_cache()
    mean, mx, _ = _sampler_vs_learner(llm, lm, arch.tok, 1.0, seed=12)
    RESULTS.setdefault(arch.name, {})["stale_checkpoint_T1.0_mean"] = mean
    assert (mean > 1e-3) == bool(expected), f"mean |diff| {mean:.3g} after a checkpoint-form reload"


def test_plain_reload_of_the_full_hf_state_dict(arch, llm):
    """The project's call today: ``reload_weights`` with the full HF state dict (tied alias
    included). Works, except where vLLM has no ``lm_head`` module at all (Gemma 2): there it
    raises AND leaves the layers on the meta device -- the next generate would kill the engine --
    so the test restores the engine with :func:`reload_hf_weights` right away."""
    from ray_rlhf.generation.vllm_engine import reload_hf_weights

    lm = _load_hf(arch.path)
    sent = _perturbed_state(lm, seed=2)
    if arch.name == "gemma2":
        with pytest.raises(ValueError, match="no module or parameter named 'lm_head'"):
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(sent.items())})
        llm.collective_rpc(reload_hf_weights, kwargs={"weights": sent})
    else:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(sent.items())})
    assert state_dict_checksum(_readback(llm)) == state_dict_checksum(sent)


@pytest.mark.parametrize("form", ["full", "checkpoint"])
def test_reload_hf_weights_lands_the_update_and_the_sampler_follows(arch, llm, form, record_property):
    """:func:`reload_hf_weights` with either payload form: exact read-back checksum, and the
    sampler's log-probs are the UPDATED HF model's (stale logits would show here)."""
    from ray_rlhf.generation.vllm_engine import reload_hf_weights

    lm = _load_hf(arch.path)
    sent = _perturbed_state(lm, seed=3 if form == "full" else 4, scale=0.05)
    payload = dict(sent)
    if form == "checkpoint" and arch.name in TIED:
        del payload["lm_head.weight"]
    llm.collective_rpc(reload_hf_weights, kwargs={"weights": payload})
    llm.reset_prefix_cache()
    assert state_dict_checksum(_readback(llm)) == state_dict_checksum(sent)
    mean, mx, n = _sampler_vs_learner(llm, lm, arch.tok, 1.0, seed=13)
    RESULTS.setdefault(arch.name, {})[f"updated_{form}_T1.0_max"] = mx
    record_property(f"{arch.name}_updated_{form}", {"mean": mean, "max": mx, "tokens": n})
    assert mean <= MEAN_TOL, f"after update ({form}): mean |diff| {mean:.3g}, max {mx:.3g}"


# ------------------------------------------------------------- (e) the project's loop, end to end


def test_the_loop_on_this_architecture(arch, llm, tmp_path):
    """Generator -> reward -> one Learner step -> weight sync with read-back verify -> checkpoint
    and resume, with the project's own classes; the learner's log-probs equal the sampler's before
    the update (T = 1.0 and 0.7), and the resumed learner holds exactly the trained weights."""
    from ray_rlhf.config.schema import KLConfig, PPOConfig
    from ray_rlhf.data.prompts import tokenize_prompts
    from ray_rlhf.learning.learner import Learner
    from ray_rlhf.records import PromptShard, RolloutBatch, SamplingSpec
    from ray_rlhf.rewards.rules import letter_frequency
    from ray_rlhf.sync.broadcaster import compare_checksums

    gen = arch.gen
    ppo = PPOConfig(epochs=1, minibatch_size=10, micro_batch_size=5, lr=1e-3)
    learner = Learner(str(arch.path), ppo, KLConfig(), seed=0)

    def sync(version: int) -> None:  # what the object-store broadcast does, in process: the learner's export
        payload = learner.weights.export()
        sent = {d: a.copy() for d, a in payload.buffers.items()}
        for a in payload.buffers.values():
            a.flags.writeable = False  # as a generator maps it from Ray's object store
        gen.weights.load(version, payload)
        assert all(np.array_equal(a, sent[d]) for d, a in payload.buffers.items())  # the engine load only read it
        compare_checksums(version, learner.weights_checksum(), [gen.weights.status()], [gen.weights.engine_checksum()])

    sync(100)  # earlier tests of this module moved the engine's weights: back to the checkpoint's
    items = tokenize_prompts([*TEXTS, *MESSAGES], arch.tok, max_prompt_tokens=64)
    shard = PromptShard(0, tuple(items))
    for temperature in (0.7, 1.0):
        learner.temperature = temperature
        _, batch = gen.generate(shard, SamplingSpec(n=2, max_new_tokens=MAX_NEW, temperature=temperature, seed=3))
        batch = batch.with_rewards(np.array([letter_frequency(p, r) for p, r in zip(batch.prompt, batch.response)]), {})
        if temperature == 0.7:  # the learner's view of the sampler's tokens, before any update
            from ray_rlhf.learning.batch import collate

            _, pstats = learner.prepare(collate(batch, learner.pad_id))
            assert pstats["sampler_logprob_diff"] <= MEAN_TOL, pstats
    stats = learner.step(batch)  # T = 1.0; prepare checks the same difference on this batch
    assert stats.sampler_logprob_diff <= MEAN_TOL and np.isfinite(stats.policy_loss), stats
    assert learner.weights_checksum() != state_dict_checksum(learner.reference.lm.state_dict())
    sync(101)  # the updated weights, tied and packed tensors included, read back from the engine
    # sync.verify_parts: each part reads its packed layers in full and one sampled input feature of
    # the others (Conv1D, fused, tied and padded heads included); all of them equal what was received.
    parts = [gen.weights.engine_checksum(p, 3) for p in range(3)]
    assert not any(c.mismatched for c in parts), [c.mismatched for c in parts]
    assert set().union(*(c.names for c in parts)) | set().union(*(c.sampled for c in parts)) == set(
        gen.weights.engine_checksum().names)
    assert all(c.sampled for c in parts)
    _, after = gen.generate(shard, SamplingSpec(n=2, max_new_tokens=MAX_NEW, temperature=1.0, seed=3))
    assert isinstance(after, RolloutBatch) and set(after.policy_version.tolist()) == {101}

    learner.save_state(tmp_path)
    resumed = Learner(str(arch.path), ppo, KLConfig(), seed=1)
    resumed.load_state(tmp_path)
    assert resumed.weights_checksum() == learner.weights_checksum()
    assert resumed.version == learner.version
    for names in _tied_groups(resumed.model.lm):  # a tied model stays tied after the load
        assert len({id(resumed.model.lm.get_parameter(n)) for n in names}) == 1, names
