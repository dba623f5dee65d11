"""Offline model factory: random-init Llama models and a byte-level BPE tokenizer, built locally.

No model hub is reachable here or in CI, so the project makes its own models. A *preset* names a
Llama shape (:data:`PRESETS`); :func:`build_causal_lm` and :func:`build_reward_model` write a
Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files,
``generation_config.json``) that transformers and vLLM both load. Everything is deterministic: the
tokenizer is trained on the bundled text in ``models/corpus/`` and the weights come from a fixed
torch seed, so the same preset and seed give byte-identical safetensors.

Tokenizer conventions (Llama-like): ``<s>`` (bos) is prepended by ``tokenizer(text)`` /
``add_special_tokens=True``; ``</s>`` is eos; ``<pad>`` is a separate pad token (pad != eos, so a
padded position is never mistaken for a stop).

Use :func:`ensure_model` to build a model once into a cache directory and reuse it.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ray_rlhf.errors import UserError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
"""Special tokens, in id order: ``<s>`` = 0, ``</s>`` = 1, ``<pad>`` = 2."""

MODEL_KINDS = ("policy", "reward")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""The offline presets' chat template: plain ``role: content`` lines (no special tokens beyond
``<s>``), ending with ``assistant:`` when a generation prompt is asked for."""


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a Llama model."""

    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Attention (query) heads; ``hidden_size / num_heads`` is the head dim."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than ``num_heads``)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    vocab_size: int
    """Tokenizer vocabulary trained for this preset, and the embedding rows."""
    max_position_embeddings: int
    """Longest sequence (prompt + response) the model accepts."""


PRESETS: dict[str, ModelPreset] = {
    # ~1.8 M parameters: unit and integration tests, the demo.
    "tiny": ModelPreset(256, 2, 4, 2, 768, 512, 512),
    # ~26 M parameters: the "small" run preset, throughput benchmarks.
    "small": ModelPreset(512, 8, 8, 4, 1536, 512, 1024),
    # ~98 M parameters: weight-sync benchmarks only (never built in tests).
    "medium": ModelPreset(768, 12, 12, 4, 2816, 512, 2048),
}


def get_preset(preset: str) -> ModelPreset:
    """The preset named ``preset``; a :class:`UserError` listing the valid names otherwise."""
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise UserError(
            f"unknown model preset {preset!r} (valid presets: {', '.join(PRESETS)}); "
            "pick one of them or set model.policy_path to a Hugging Face model directory"
        ) from None


# ----------------------------------------------------------------------------------- tokenizer


def _corpus_lines() -> list[str]:
    """Non-empty lines of every bundled corpus file, files in name order."""
    corpus = resources.files("ray_rlhf.models") / "corpus"
    lines: list[str] = []
    for entry in sorted(corpus.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".txt"):
            lines.extend(line for line in entry.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise RuntimeError(f"bundled tokenizer corpus is empty: {corpus}")
    return lines


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    """Serialized ``tokenizers`` tokenizer trained on the bundled corpus (cached per size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Byte-level offsets, then prepend <s> (Llama convention): tokenizer(text) == [<s>, ...].
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok.to_str()


def train_tokenizer(vocab_size: int, model_max_length: int | None = None):
    """A byte-level BPE tokenizer trained on the bundled corpus, as a ``PreTrainedTokenizerFast``.

    Deterministic: the same ``vocab_size`` always gives the same vocabulary and merges. Every byte
    is in the base alphabet, so any text encodes without unknown tokens and ``decode`` (with
    ``skip_special_tokens=True``) returns the original text. Special tokens: ``<s>`` (bos, added
    in front by ``add_special_tokens=True``), ``</s>`` (eos), ``<pad>`` (pad). Chat template:
    :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(
            f"tokenizer vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# -------------------------------------------------------------------------------------- models


def _llama_config_kwargs(p: ModelPreset, tokenizer) -> dict:
    import torch

    return dict(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=torch.float32,
    )


def _build(kind: str, preset: str, out_dir, seed: int) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    p = get_preset(preset)
    tokenizer = train_tokenizer(p.vocab_size, model_max_length=p.max_position_embeddings)
    if len(tokenizer) > p.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than the preset's {p.vocab_size}")
    kwargs = _llama_config_kwargs(p, tokenizer)
    if kind == "policy":
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    else:
        config, cls = LlamaConfig(num_labels=1, **kwargs), LlamaForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A private RNG stream: the caller's global torch RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if kind == "policy":
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(out)
    return out


def build_causal_lm(preset: str, out_dir, seed: int = 0) -> Path:
    """Write a random-init ``LlamaForCausalLM`` of ``preset`` (float32) plus tokenizer to ``out_dir``.

    Same ``preset`` and ``seed`` => identical ``model.safetensors``. Returns ``out_dir`` as a Path.
    """
    return _build("policy", preset, out_dir, seed)


def build_reward_model(preset: str, out_dir, seed: int = 0) -> Path:
    """Write a random-init ``LlamaForSequenceClassification`` (one label = a scalar reward).

    ``pad_token_id`` is set in the config, so the model scores the last non-pad token of each
    sequence. Same tokenizer as :func:`build_causal_lm`.
    """
    return _build("reward", preset, out_dir, seed)


FACTORY_VERSION = 2
"""Bumped whenever what the factory writes changes (2: the tokenizer has a chat template), so a
model cache built by an older version is not reused."""


def model_dir_name(kind: str, preset: str, seed: int = 0) -> str:
    """Name of the cache entry :func:`ensure_model` uses: ``<kind>-<preset>-seed<seed>-v<version>``."""
    return f"{kind}-{preset}-seed{seed}-v{FACTORY_VERSION}"


def ensure_model(kind: str, preset: str, cache_dir, seed: int = 0) -> Path:
    """Build ``kind`` ("policy" or "reward") of ``preset`` into ``cache_dir`` once; return its path.

    The model is built in a temporary directory beside the target and renamed into place, so a
    half-built directory is never used; when several processes race, the first rename wins and
    the others reuse it.
    """
    if kind not in MODEL_KINDS:
        raise UserError(f"unknown model kind {kind!r}: use one of {', '.join(MODEL_KINDS)}")
    get_preset(preset)
    cache = Path(cache_dir)
    target = cache / model_dir_name(kind, preset, seed)
    if target.is_dir():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create model cache directory {cache}: {e}; set model.cache_dir to a writable path") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
    try:
        _build(kind, preset, tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # a real failure, not a lost race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def parameter_count(path) -> int:
    """Number of parameters stored in a model directory's safetensors files (no model is built)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors file in {path}: point at a Hugging Face model directory")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total
