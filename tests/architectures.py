"""An offline architecture matrix for the tests: tiny random-init causal LMs of several Hugging
Face families.

People bring Hugging Face models of many architectures; no hub is reachable here, so
:func:`build_arch` writes a tiny random-init model of a named architecture (``config.json``,
``model.safetensors``, tokenizer files with a chat template, ``generation_config.json``) from the
transformers config classes. Each entry exercises what makes its family different from plain
Llama -- the things a learner or a weight sync can get wrong:

==============  =========================================================================
``llama_tied``  Llama with ``tie_word_embeddings=True`` (checkpoint has no ``lm_head.weight``)
``qwen2``       q/k/v biases, tied
``qwen3``       q/k RMSNorm, explicit ``head_dim``, tied
``gpt2``        learned positions, dropout 0.1 in the config, Conv1D (in, out) weights, tied
``gemma2``      final-logit and attention soft-capping, sliding window on alternate layers,
                sqrt(hidden)-scaled embeddings, tied
``gemma3``      (text-only) q/k norm, local/global layers with two rope bases, tied
``mistral``     sliding-window attention on every layer, untied
``phi3``        FUSED ``qkv_proj`` / ``gate_up_proj`` in the checkpoint itself, untied
``granite``     embedding / residual / attention multipliers, logits DIVIDED by ``logits_scaling``
``cohere``      parallel attention+MLP, LayerNorm, logits MULTIPLIED by ``logit_scale``, tied
==============  =========================================================================

Sizes: hidden 128, 2 layers, 4 query heads of 32 (vLLM's CPU attention needs head_dim >= 32),
2 key/value heads, vocab 512. Each model has 0.2-0.4 M parameters and loads in about a second.

Tokenizer: the project's byte-level BPE (:func:`ray_rlhf.models.factory.train_tokenizer`) trained
to ``512 - len(turn tokens)`` entries, plus the family's chat turn markers as added special tokens,
so ``len(tokenizer) == vocab_size == 512``. ``<s>`` / ``</s>`` / ``<pad>`` are bos / eos / pad
(ids 0 / 1 / 2) in every family; ``tokenizer(text)`` prepends ``<s>`` for the families whose
real tokenizers add a BOS (Llama, Gemma, Mistral, Phi-3) and nothing for the others (Qwen, GPT-2,
Granite, Cohere). ``generation_config.eos_token_id`` lists ``</s>`` and the family's end-of-turn
token, like instruct checkpoints do.

Deterministic: the same name and seed give byte-identical ``model.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_rlhf.errors import UserError

VOCAB_SIZE = 512
HIDDEN = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 32: the smallest head size vLLM's CPU attention accepts
INTERMEDIATE = 256
MAX_POSITIONS = 512
INIT_STD = 0.1
"""``initializer_range``. HF's default 0.02 gives near-uniform next-token distributions (entropy
6.21 of a possible 6.24 nats), under which a missing Gemma 2 soft-cap moves log-probs by < 4e-4;
at 0.1 (entropy ~5.6, ~4 for Gemma) it moves them by ~0.26, so the checks have teeth."""
SLIDING_WINDOW = 16
"""Small on purpose: a prompt plus a few dozen generated tokens crosses it, so sampler and
learner must agree on what a sliding-window layer attends to."""


# ------------------------------------------------------------------------------ chat templates

_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = m['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
    "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
)
_PHI3 = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_GPT2 = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_GRANITE = (
    "{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}<|end_of_text|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}"
)
_COHERE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set role = 'USER' %}"
    "{% elif m['role'] == 'assistant' %}{% set role = 'CHATBOT' %}{% else %}{% set role = 'SYSTEM' %}{% endif %}"
    "<|START_OF_TURN_TOKEN|><|{{ role }}_TOKEN|>{{ m['content'] }}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A family's chat conventions."""

    template: str
    """Jinja chat template (``tokenizer.apply_chat_template``)."""
    turn_tokens: tuple[str, ...]
    """Turn markers added to the tokenizer as special tokens (one id each)."""
    end_of_turn: str
    """Token that ends an assistant turn; listed in ``generation_config.eos_token_id``."""
    add_bos: bool
    """Whether ``tokenizer(text)`` prepends ``<s>`` (as the family's real tokenizer does)."""
    generation_prompt: str
    """What ``add_generation_prompt=True`` appends (Mistral's template has none: its prompt
    already ends with ``[/INST]``)."""


_CHAT = {
    "llama3": ChatFormat(
        _LLAMA3,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        True,
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    # <|endoftext|> too: transformers 5 loads a qwen2 directory with Qwen2Tokenizer whatever
    # tokenizer_class says, and that class adds <|endoftext|> (its unk) when the vocab lacks it.
    "chatml": ChatFormat(_CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", False, "<|im_start|>assistant\n"),
    "gemma": ChatFormat(_GEMMA, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", True, "<start_of_turn>model\n"),
    "mistral": ChatFormat(_MISTRAL, ("[INST]", "[/INST]"), "</s>", True, ""),
    "phi3": ChatFormat(_PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>", True, "<|assistant|>\n"),
    "gpt2": ChatFormat(_GPT2, (), "</s>", False, "assistant:"),
    "granite": ChatFormat(
        _GRANITE,
        ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
        "<|end_of_text|>",
        False,
        "<|start_of_role|>assistant<|end_of_role|>",
    ),
    "cohere": ChatFormat(
        _COHERE,
        ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"),
        "<|END_OF_TURN_TOKEN|>",
        False,
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    ),
}


def chat_format(name: str) -> ChatFormat:
    """The chat conventions of architecture ``name``."""
    return _CHAT[get_spec(name).chat]


# -------------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class ArchSpec:
    """One row of the matrix: a transformers config class, its arguments and a chat format."""

    config_class: str
    """Name of the transformers config class (e.g. ``"Qwen2Config"``)."""
    model_class: str
    """Name of the transformers causal-LM class (e.g. ``"Qwen2ForCausalLM"``)."""
    chat: str
    """Key of the chat format (:data:`_CHAT`)."""
    config: dict
    """Family-specific config arguments, on top of the common sizes and special-token ids."""
    what: str
    """What this entry exercises (one line, for reports)."""


_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POSITIONS,
    initializer_range=INIT_STD,
)

SPECS: dict[str, ArchSpec] = {
    "llama_tied": ArchSpec(
        "LlamaConfig", "LlamaForCausalLM", "llama3", dict(_COMMON, tie_word_embeddings=True), "Llama, tied embeddings"
    ),
    "qwen2": ArchSpec("Qwen2Config", "Qwen2ForCausalLM", "chatml", dict(_COMMON, tie_word_embeddings=True), "q/k/v biases, tied"),
    "qwen3": ArchSpec(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        "chatml",
        dict(_COMMON, head_dim=HEAD_DIM, tie_word_embeddings=True),
        "q/k RMSNorm, tied",
    ),
    "gpt2": ArchSpec(
        "GPT2Config",
        "GPT2LMHeadModel",
        "gpt2",
        dict(
            vocab_size=VOCAB_SIZE,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            initializer_range=INIT_STD,
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            tie_word_embeddings=True,
        ),
        "learned positions, dropout 0.1, Conv1D weights, tied",
    ),
    "gemma2": ArchSpec(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        "gemma",
        dict(
            _COMMON,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=SLIDING_WINDOW,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            tie_word_embeddings=True,
        ),
        "final-logit + attention soft-capping, sliding window, scaled embeddings, tied",
    ),
    "gemma3": ArchSpec(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        "gemma",
        dict(
            _COMMON,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        ),
        "q/k norm, local/global layers with two rope bases, tied",
    ),
    "mistral": ArchSpec(
        "MistralConfig",
        "MistralForCausalLM",
        "mistral",
        dict(_COMMON, head_dim=HEAD_DIM, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False),
        "sliding-window attention on every layer, untied",
    ),
    "phi3": ArchSpec(
        "Phi3Config",
        "Phi3ForCausalLM",
        "phi3",
        dict(_COMMON, tie_word_embeddings=False),
        "fused qkv_proj / gate_up_proj in the checkpoint, untied",
    ),
    "granite": ArchSpec(
        "GraniteConfig",
        "GraniteForCausalLM",
        "granite",
        dict(
            _COMMON,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=1.0 / HEAD_DIM,
            logits_scaling=8.0,
            tie_word_embeddings=True,
        ),
        "embedding/residual/attention multipliers, logits / logits_scaling, tied",
    ),
    "cohere": ArchSpec(
        "CohereConfig",
        "CohereForCausalLM",
        "cohere",
        dict(_COMMON, logit_scale=0.0625, tie_word_embeddings=True),
        "parallel attention+MLP, LayerNorm, logits * logit_scale, tied",
    ),
}

ARCHITECTURES: tuple[str, ...] = tuple(SPECS)
"""Names accepted by :func:`build_arch`."""


def get_spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` named ``name``; a :class:`UserError` listing the valid names otherwise."""
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown architecture {name!r}; valid names: {', '.join(ARCHITECTURES)}") from None


# ---------------------------------------------------------------------------------- building


def build_tokenizer(name: str):
    """The tokenizer of architecture ``name``: byte-level BPE + the family's turn tokens + template.

    ``len(tokenizer) == VOCAB_SIZE``; ids 0/1/2 are ``<s>``/``</s>``/``<pad>``; the turn tokens
    take the last ids.
    """
    from tokenizers import processors

    from ray_rlhf.models.factory import BOS, train_tokenizer

    chat = chat_format(name)
    tok = train_tokenizer(VOCAB_SIZE - len(chat.turn_tokens), model_max_length=MAX_POSITIONS)
    if chat.turn_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(chat.turn_tokens)})
    if not chat.add_bos:
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    elif tok("a")["input_ids"][0] != tok.convert_tokens_to_ids(BOS):  # the factory's convention
        raise RuntimeError(f"{name}: tokenizer does not prepend {BOS}")
    tok.chat_template = chat.template
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"{name}: tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok


def build_config(name: str, tokenizer=None):
    """The transformers config of architecture ``name`` (float32, special-token ids from the tokenizer)."""
    import torch
    import transformers

    spec = get_spec(name)
    tok = tokenizer if tokenizer is not None else build_tokenizer(name)
    return getattr(transformers, spec.config_class)(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype=torch.float32,
        **spec.config,
    )


def build_model(name: str, seed: int = 0, tokenizer=None):
    """A random-init float32 causal LM of architecture ``name`` (eval mode). Global RNG untouched."""
    import torch
    import transformers

    config = build_config(name, tokenizer)
    cls = getattr(transformers, get_spec(name).model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32).eval()
    return model


def end_of_turn_ids(name: str, tokenizer) -> list[int]:
    """``generation_config.eos_token_id`` of ``name``: ``</s>`` and the end-of-turn token (deduplicated)."""
    eot = tokenizer.convert_tokens_to_ids(chat_format(name).end_of_turn)
    return sorted({tokenizer.eos_token_id, eot})


def build_arch(name: str, out_dir, seed: int = 0) -> Path:
    """Write a tiny random-init causal LM of architecture ``name`` to ``out_dir``; return it as a Path.

    Files: ``config.json``, ``model.safetensors`` (float32; a tied model stores no
    ``lm_head.weight``), ``tokenizer.json`` + ``tokenizer_config.json`` (with ``chat_template``),
    ``special_tokens_map.json`` when transformers writes one, ``generation_config.json``.
    Same ``name`` and ``seed`` => identical ``model.safetensors``.
    """
    from transformers import GenerationConfig

    tok = build_tokenizer(name)
    model = build_model(name, seed, tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _template_into_tokenizer_config(out, tok.chat_template)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=end_of_turn_ids(name, tok),
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(out)
    return out


def _template_into_tokenizer_config(out: Path, template: str) -> None:
    """Keep the chat template in ``tokenizer_config.json`` (where older transformers and most
    serving stacks look), not only in the ``chat_template.jinja`` newer transformers write."""
    import json

    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("chat_template") != template:
        cfg["chat_template"] = template
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
