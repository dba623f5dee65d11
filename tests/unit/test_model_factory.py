"""The offline model factory: tokenizer, presets, deterministic builds, the ensure_model cache."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from ray_rlhf.errors import UserError
from ray_rlhf.models import factory
from ray_rlhf.models.factory import (
    PRESETS,
    build_causal_lm,
    build_reward_model,
    ensure_model,
    parameter_count,
    train_tokenizer,
)

TEXTS = [
    "Once upon a time, a small fox lived at the edge of a quiet forest.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnewlines\r\n and  double  spaces",
    "Unicode: café, naïve, Ünïcödé, 日本語, emoji 😀🚀",
    "Symbols: <html> </p> {json: [1, 2.5e3]} #~`|\\ @$%^&*()_+=",
    "",
]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _meta_parameter_count(preset: str) -> int:
    """Parameters of a preset's causal LM, counted on the meta device (no memory, no init)."""
    tok = train_tokenizer(PRESETS[preset].vocab_size)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**factory._llama_config_kwargs(PRESETS[preset], tok)))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens():
    tok = train_tokenizer(512)
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id  # <s> prepended, Llama-style
    assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
    assert tok("hello", add_special_tokens=False)["input_ids"] == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(text):
    tok = train_tokenizer(512)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_is_deterministic():
    first = factory._tokenizer_json(512)
    factory._tokenizer_json.cache_clear()
    assert factory._tokenizer_json(512) == first  # retrained from scratch
    assert train_tokenizer(512).get_vocab() == train_tokenizer(512).get_vocab()


def test_tokenizer_too_small_vocab_is_user_error():
    with pytest.raises(UserError, match="vocab_size 100"):
        train_tokenizer(100)


def test_saved_tokenizer_loads_with_auto_tokenizer(tiny_policy_path):
    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    ref = train_tokenizer(512)
    assert tok.get_vocab() == ref.get_vocab()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------------ presets


def test_preset_parameter_counts():
    assert 1_000_000 <= _meta_parameter_count("tiny") <= 2_000_000
    assert 20_000_000 <= _meta_parameter_count("small") <= 30_000_000
    assert 80_000_000 <= _meta_parameter_count("medium") <= 120_000_000


def test_built_tiny_parameter_count(tiny_policy_path):
    assert parameter_count(tiny_policy_path) == _meta_parameter_count("tiny")


def test_presets_are_consistent():
    for name, p in PRESETS.items():
        assert p.hidden_size % p.num_heads == 0, name
        assert p.num_heads % p.num_kv_heads == 0, name
        assert len(train_tokenizer(p.vocab_size)) <= p.vocab_size, name


def test_unknown_preset_is_user_error_listing_presets(tmp_path):
    with pytest.raises(UserError, match="unknown model preset 'huge'.*tiny, small, medium"):
        build_causal_lm("huge", tmp_path / "m")
    with pytest.raises(UserError, match="unknown model preset"):
        build_reward_model("huge", tmp_path / "r")
    with pytest.raises(UserError, match="unknown model preset"):
        ensure_model("policy", "huge", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written before the check


# ------------------------------------------------------------------------------------- builds


def test_build_is_deterministic(tmp_path, tiny_policy_path):
    a = build_causal_lm("tiny", tmp_path / "a", seed=0)
    b = build_causal_lm("tiny", tmp_path / "b", seed=0)
    c = build_causal_lm("tiny", tmp_path / "c", seed=1)
    assert _sha256(a / "model.safetensors") == _sha256(b / "model.safetensors")
    assert _sha256(a / "model.safetensors") == _sha256(tiny_policy_path / "model.safetensors")
    assert _sha256(a / "model.safetensors") != _sha256(c / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (a / name).read_text() == (b / name).read_text(), name


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_causal_lm("tiny", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_policy_config_and_generation_config(tiny_policy_path):
    config = json.loads((tiny_policy_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (256, 2, 512)
    gen = json.loads((tiny_policy_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 1, 2)


def test_policy_loads_and_generates(tiny_policy_path):
    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_path).eval()
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    enc = tok(["Once upon a time", "The sun is"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True)
    prompt_len = enc["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 8
    assert torch.equal(out[:, :prompt_len], enc["input_ids"])
    assert int(out.max()) < 512
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert texts[0].startswith("Once upon a time") and texts[1].startswith("The sun is")


def test_reward_model_gives_one_scalar_per_sequence(tiny_reward_path):
    config = json.loads((tiny_reward_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(tiny_reward_path)
    assert tok.get_vocab() == train_tokenizer(512).get_vocab()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_path).eval()
    texts = ["A short one.", "A much longer sequence of words, to force right padding of the first."]
    enc = tok(texts, return_tensors="pt", padding=True)  # right padding
    with torch.no_grad():
        batched = model(**enc).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
    assert batched.shape == (2, 1)
    assert torch.isfinite(batched).all()
    # The score reads the last non-pad token: padding must not change it.
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- ensure_model


def test_ensure_model_builds_once_and_reuses(tmp_path):
    path = ensure_model("policy", "tiny", tmp_path, seed=3)
    assert path == tmp_path / "policy-tiny-seed3-v2"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("policy", "tiny", tmp_path, seed=3) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["policy-tiny-seed3-v2"]  # no temp dir left


def test_ensure_model_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken_build(kind, preset, out_dir, seed):
        (out_dir / "config.json").write_text("{}")  # half-written
        raise RuntimeError("disk full")

    monkeypatch.setattr(factory, "_build", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_model("reward", "tiny", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ensure_model_unknown_kind_is_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown model kind 'critic'"):
        ensure_model("critic", "tiny", tmp_path)


def test_parameter_count_needs_safetensors(tmp_path):
    with pytest.raises(UserError, match="no \\*.safetensors"):
        parameter_count(tmp_path)
