"""The offline tiny policy loads in a real vLLM (CPU) engine, in-process, and generates."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration

PROMPTS = ["Once upon a time, a small fox", "The sun is", "Question: Where do fish live? Answer:"]


@pytest.fixture(scope="module")
def llm(tiny_policy_path):
    # In-process engine (no engine-core subprocess), 1 GiB KV cache: set before importing vllm.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm = pytest.importorskip("vllm")
    engine = vllm.LLM(
        model=str(tiny_policy_path),
        distributed_executor_backend="uni",
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
    )
    yield engine
    del engine


def _generate(llm, prompts, seed):
    from vllm import SamplingParams

    params = SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=seed, logprobs=0)
    return llm.generate(prompts, params, use_tqdm=False)


def test_tiny_policy_generates_in_vllm(llm, tiny_policy_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    outputs = _generate(llm, PROMPTS, seed=1)
    assert [o.prompt for o in outputs] == PROMPTS
    for out in outputs:
        # vLLM tokenizes prompts exactly as the learner will (<s> in front).
        assert list(out.prompt_token_ids) == tok(out.prompt)["input_ids"]
        assert len(out.outputs) == 2
        for sample in out.outputs:
            ids = list(sample.token_ids)
            assert 1 <= len(ids) <= 16
            assert all(0 <= i < len(tok) for i in ids)
            assert sample.finish_reason in ("stop", "length")
            assert len(sample.logprobs) == len(ids)  # one sampling logprob per token
            # The engine's text is our tokenizer's decoding of the sampled ids (a trailing
            # incomplete UTF-8 sequence may be held back by vLLM's incremental detokenizer).
            ours = tok.decode(ids, skip_special_tokens=True)
            assert ours.startswith(sample.text)
            assert set(ours[len(sample.text) :]) <= {"\ufffd"}


def test_vllm_sampling_is_seeded(llm):
    first = [[list(s.token_ids) for s in o.outputs] for o in _generate(llm, PROMPTS[:2], seed=5)]
    again = [[list(s.token_ids) for s in o.outputs] for o in _generate(llm, PROMPTS[:2], seed=5)]
    assert first == again
