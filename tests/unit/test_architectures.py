"""The offline architecture matrix (HF side only): builds, chat templates, the learner's split
forward (trunk + output head) against the model's own forward, and tie-safe loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from ray_rlhf.models.output_head import (
    OutputHeadMismatch,
    attention_implementation,
    check_output_head,
    load_hf_state,
    output_logits,
    tied_parameter_groups,
    trunk_hidden,
)
from ray_rlhf.models.policy import sequence_inputs
from tests.architectures import ARCHITECTURES, VOCAB_SIZE, build_arch, build_model, chat_format, get_spec

TIED = {n for n in ARCHITECTURES if get_spec(n).config.get("tie_word_embeddings")}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    """Every architecture built once (seed 0); ~0.2 s each."""
    root = tmp_path_factory.mktemp("archs")
    return {n: build_arch(n, root / n, seed=0) for n in ARCHITECTURES}


def _load(path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention_implementation(cfg)).eval()


def _padded_batch(seed=0, lengths=((8, 10), (3, 14), (8, 3)), pad_id=2):
    """Left-padded prompts + right-padded responses of the given (prompt, response) lengths.

    P = 8, T = 14: row 1 has 5 pads in front, row 2 has 11 at the end; rows 0 and 1 (18 and 17
    real tokens) are longer than the 16-token sliding window of Gemma 2/3 and Mistral.
    """
    g = torch.Generator().manual_seed(seed)
    P, T = max(p for p, _ in lengths), max(t for _, t in lengths)
    prompt_ids = torch.full((len(lengths), P), pad_id)
    prompt_mask = torch.zeros(len(lengths), P, dtype=torch.long)
    response_ids = torch.full((len(lengths), T), pad_id)
    response_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, (p, t) in enumerate(lengths):
        prompt_ids[i, P - p :] = torch.randint(3, VOCAB_SIZE, (p,), generator=g)
        prompt_mask[i, P - p :] = 1
        response_ids[i, :t] = torch.randint(3, VOCAB_SIZE, (t,), generator=g)
        response_mask[i, :t] = 1
    return prompt_ids, prompt_mask, response_ids, response_mask


# --------------------------------------------------------------------------------- building


def test_matrix_names_the_required_families():
    assert {"llama_tied", "qwen2", "qwen3", "gpt2", "gemma2", "mistral", "phi3"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_directory_is_a_complete_hf_model(arch_dirs, name):
    from transformers import AutoTokenizer, GenerationConfig

    d = arch_dirs[name]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file(), f
    tok = AutoTokenizer.from_pretrained(d)
    lm = _load(d)
    assert type(lm).__name__ == get_spec(name).model_class
    assert len(tok) == VOCAB_SIZE == lm.get_output_embeddings().weight.shape[0]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert 0.1e6 < sum(p.numel() for p in lm.parameters()) < 1e6  # tiny: loads in about a second
    # The template lives in tokenizer_config.json too (older transformers and servers read it there).
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    eos = GenerationConfig.from_pretrained(d).eos_token_id
    assert isinstance(eos, list) and tok.eos_token_id in eos


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_chat_template_renders_a_generation_prompt(arch_dirs, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(arch_dirs[name])
    messages = [
        {"role": "user", "content": "Where do fish live?"},
        {"role": "assistant", "content": "In water."},
        {"role": "user", "content": "And birds?"},
    ]
    fmt = chat_format(name)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    without = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert "Where do fish live?" in text and "In water." in text and "And birds?" in text
    assert text == without + fmt.generation_prompt
    assert text.startswith("<s>") == fmt.add_bos  # BOS in the template exactly when the tokenizer adds one
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < VOCAB_SIZE
    # Each turn marker is ONE token (an added special token), not split into bytes.
    for marker in ("<|im_start|>", "<start_of_turn>", "<|eot_id|>", "<|end|>", "[INST]", "<|END_OF_TURN_TOKEN|>"):
        if marker in text:
            assert tok.convert_tokens_to_ids(marker) in ids


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_build_is_deterministic_per_seed(tmp_path, name):
    a = (build_arch(name, tmp_path / "a", seed=3) / "model.safetensors").read_bytes()
    b = (build_arch(name, tmp_path / "b", seed=3) / "model.safetensors").read_bytes()
    c = (build_arch(name, tmp_path / "c", seed=4) / "model.safetensors").read_bytes()
    assert a == b and a != c


def test_unknown_architecture_is_a_user_error(tmp_path):
    from ray_rlhf.errors import UserError

    with pytest.raises(UserError, match="valid names: llama_tied"):
        build_arch("llama4", tmp_path)


# ------------------------------------------------------------------------- the output head


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_output_logits_of_trunk_equal_the_models_forward(arch_dirs, name):
    """Left-padded prompts, right-padded responses, explicit positions: ``output_logits(trunk)``
    equals ``lm(...).logits`` at every real token (1e-5, float32, eval mode)."""
    lm = _load(arch_dirs[name])
    ids, mask, pos = sequence_inputs(*_padded_batch())
    with torch.no_grad():
        ref = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        ours = output_logits(lm, trunk_hidden(lm, ids, mask, pos))
    real = mask.bool()
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.isfinite(ours[real]).all()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)
    assert check_output_head(lm) <= 1e-5


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_padding_does_not_change_the_logits(arch_dirs, name):
    """A left-padded row (positions from 0 at its first real token) gives the logits of the same
    tokens unpadded -- for rotary AND learned (GPT-2) positions, across the sliding window."""
    lm = _load(arch_dirs[name])
    ids, mask, pos = sequence_inputs(*_padded_batch())
    row = 1  # 5 pads in front, 17 real tokens
    real = mask[row].bool()
    alone = ids[row, real][None]
    alone_pos = torch.arange(alone.shape[1])[None]
    with torch.no_grad():
        padded = output_logits(lm, trunk_hidden(lm, ids, mask, pos))[row, real]
        single = output_logits(lm, trunk_hidden(lm, alone, torch.ones_like(alone), alone_pos))[0]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=0)


def test_gpt2_needs_explicit_positions_with_left_padding(arch_dirs):
    """Learned positions: without position_ids HF counts the pads (0..L-1), shifting every position."""
    lm = _load(arch_dirs["gpt2"])
    ids, mask, pos = sequence_inputs(*_padded_batch())
    with torch.no_grad():
        right = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[1, mask[1].bool()]
        default = lm(input_ids=ids, attention_mask=mask).logits[1, mask[1].bool()]
    assert (right - default).abs().max() > 0.1


@pytest.mark.parametrize(
    ("name", "post"),
    [
        ("gemma2", lambda lg, cfg, lm: torch.tanh(lg / cfg.final_logit_softcapping) * cfg.final_logit_softcapping),
        ("granite", lambda lg, cfg, lm: lg / cfg.logits_scaling),
        ("cohere", lambda lg, cfg, lm: lg * cfg.logit_scale),
    ],
)
def test_the_plain_lm_head_is_not_enough(arch_dirs, name, post):
    """What ``lm.get_output_embeddings()(h)`` (policy.py today) misses, by hand for each family."""
    lm = _load(arch_dirs[name])
    ids, mask, pos = sequence_inputs(*_padded_batch())
    with torch.no_grad():
        h = trunk_hidden(lm, ids, mask, pos)
        plain = lm.get_output_embeddings()(h)
        ref = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(post(plain, lm.config, lm)[real], ref[real], atol=1e-5, rtol=0)
    lp_plain, lp_ref = plain.log_softmax(-1)[real], ref.log_softmax(-1)[real]
    assert (lp_plain - lp_ref).abs().max() > 0.05  # a real error in the PPO ratio, not noise


def test_check_output_head_catches_an_unknown_post_processing(arch_dirs):
    lm = _load(arch_dirs["llama_tied"])
    forward = lm.forward

    def doubled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    lm.forward = doubled
    with pytest.raises(OutputHeadMismatch, match="LlamaForCausalLM"):
        check_output_head(lm)


def test_gemma2_needs_eager_attention_for_its_attention_softcap(arch_dirs):
    """HF's sdpa kernel silently skips ``attn_logit_softcapping``; vLLM applies it. With scores
    large enough to be capped the two HF implementations disagree."""
    from transformers import AutoModelForCausalLM

    d = arch_dirs["gemma2"]
    eager = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()
    assert attention_implementation(eager.config) == "eager"
    assert all(attention_implementation(_load(arch_dirs[n]).config) is None for n in ("llama_tied", "gemma3", "gpt2"))
    with torch.no_grad():
        for m in (eager, sdpa):  # scores ~ 10^2: tanh(s / 50) * 50 is far from s
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
                layer.self_attn.k_proj.weight.mul_(8)
        ids, mask, pos = sequence_inputs(*_padded_batch())
        a = eager(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
        b = sdpa(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    assert (a - b).abs().max() > 1e-2


def test_gpt2_dropout_is_live_in_train_mode(arch_dirs):
    """GPT-2 ships dropout 0.1: in ``train()`` mode the same input gives different logits, so a
    learner that computes old log-probs in eval mode and new ones in train mode sees ratio != 1
    on unchanged weights. (The learner must switch dropout off.)"""
    lm = _load(arch_dirs["gpt2"])
    ids, mask, pos = sequence_inputs(*_padded_batch())
    with torch.no_grad():
        ev = output_logits(lm, trunk_hidden(lm, ids, mask, pos))
        lm.train()
        tr = output_logits(lm, trunk_hidden(lm, ids, mask, pos))
    assert (ev - tr)[mask.bool()].abs().max() > 1e-2


# --------------------------------------------------------------------- save / load, ties


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_save_and_load_keep_the_tie(tmp_path, arch_dirs, name):
    lm = _load(arch_dirs[name])
    groups = tied_parameter_groups(lm)
    assert bool(groups) == (name in TIED)
    lm.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    again = _load(tmp_path / "saved")
    assert tied_parameter_groups(again) == groups
    for names in groups:
        assert sum(n in saved for n in names) == 1  # save_pretrained keeps one name per tie
        assert len({again.get_parameter(n).data_ptr() for n in names}) == 1
    for k, v in lm.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("name", sorted(TIED))
def test_load_hf_state_restores_a_tied_model(tmp_path, arch_dirs, name):
    from safetensors.torch import load_file

    src = _load(arch_dirs[name])
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    src.save_pretrained(tmp_path / "ckpt")
    dst = build_model(name, seed=7)  # different weights, same architecture
    raw = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*lm_head\.weight"):
        dst.load_state_dict(raw, strict=True)  # the naive way fails
    load_hf_state(dst, tmp_path / "ckpt")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    (names,) = tied_parameter_groups(dst)
    assert len({dst.get_parameter(n).data_ptr() for n in names}) == 1
    with torch.no_grad():  # still ONE tensor: a step on the embedding moves the head
        dst.get_input_embeddings().weight[5, 0] += 1.0
    assert torch.equal(dst.get_output_embeddings().weight[5], dst.get_input_embeddings().weight[5])


def test_load_hf_state_untied_model_is_plain_strict_loading(tmp_path, arch_dirs):
    src = _load(arch_dirs["mistral"])
    dst = build_model("mistral", seed=7)
    load_hf_state(dst, arch_dirs["mistral"])
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_hf_state_refuses_a_checkpoint_whose_tied_tensors_differ(tmp_path):
    from safetensors.torch import save_file

    lm = build_model("llama_tied")
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0  # saved from an untied model
    tmp_path.mkdir(exist_ok=True)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="tied in the model but differ"):
        load_hf_state(lm, tmp_path)


def test_load_hf_state_still_refuses_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import save_file

    lm = build_model("qwen2")
    state = {k: v.clone() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*model\.norm\.weight"):
        load_hf_state(lm, tmp_path)
