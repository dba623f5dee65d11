"""Next-token logits through a Hugging Face causal LM's OWN output processing, and safe loading.

The learner splits the model's forward in two -- the trunk (decoder) gives final hidden states,
the output head turns the states at response positions into logits -- so that it can run the
head only where it needs logits and put a value head on the same states. The split is only
right if the head does everything the model's ``forward`` does after the decoder::

    logits = lm_head(h)                                   every causal LM
    logits = cap * tanh(logits / cap)                     Gemma 2/3, VaultGemma, T5Gemma, nanochat
                                                          (config.final_logit_softcapping)
    logits = logits / config.logits_scaling               Granite family (muP-style output scale)
    logits = logits * lm.logit_scale                      Cohere / Cohere 2 (config.logit_scale)
    logits = logits * lm.model.lm_head_multiplier         Falcon-H1

(``lm.get_output_embeddings()(h)`` alone is the first line only: for Gemma 2 the learner's
log-probs then come from an uncapped distribution the sampler never drew from.) vLLM applies the
same steps in its ``LogitsProcessor`` (``soft_cap``, ``scale``). :func:`check_output_head` runs
one tiny forward both ways and raises if a model's forward does something this module does not
know about -- cheap enough to call once when a model is loaded.

Positions: the trunk takes explicit ``position_ids``. With left-padded prompts they must start
at 0 on the first real token (``cumsum(mask) - 1``): that is what the sampler uses, and for
learned positions (GPT-2's ``wpe``) a shift changes the output, not only for rotary ones.

Loading: :func:`load_hf_state` loads a ``save_pretrained`` directory into an existing model.
A tied model's checkpoint has no ``lm_head.weight`` (save_pretrained drops the alias), so
``load_state_dict(strict=True)`` fails with ``Missing key(s) ... lm_head.weight``; loading the
file into every alias of the shared tensor keeps the tie and the strictness.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = [
    "OutputHeadMismatch",
    "attention_implementation",
    "check_output_head",
    "load_hf_state",
    "output_logits",
    "read_hf_state",
    "tied_parameter_groups",
    "trunk_hidden",
]


class OutputHeadMismatch(RuntimeError):
    """``output_logits(lm, trunk_hidden(...))`` differs from ``lm(...).logits``."""


def _text_config(lm: nn.Module):
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def output_logits(lm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Next-token logits (float32) from final hidden states, as ``lm.forward`` computes them.

    ``logits = post(lm_head(h))`` with ``post`` the model's own output processing (module
    docstring). The LM head runs in the model's dtype; the cast to float32 happens before the
    post-processing (for float32 models identical to HF; for bf16 models more accurate).
    Shape: hidden_states (..., H) -> logits (..., V).
    """
    logits = lm.get_output_embeddings()(hidden_states).float()
    cfg = _text_config(lm)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling is not None and scaling != 1.0:
        logits = logits / scaling
    scale = getattr(lm, "logit_scale", None)  # Cohere keeps config.logit_scale on the module
    if isinstance(scale, (int, float)) and scale != 1.0:
        logits = logits * scale
    multiplier = getattr(getattr(lm, "model", None), "lm_head_multiplier", None)  # Falcon-H1
    if isinstance(multiplier, (int, float)) and multiplier != 1.0:
        logits = logits * multiplier
    return logits


def trunk_hidden(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    packed: bool = False,
) -> torch.Tensor:
    """Final hidden states of the decoder (after its final norm). Shape: (B, L) -> (B, L, H).

    ``attention_mask``: 1 = real token (left and/or right padding allowed, real tokens
    contiguous); ``position_ids``: positions of the real tokens, 0 at each row's first real token
    (:func:`ray_rlhf.models.policy.sequence_inputs`). ``packed``: one pass over the real tokens
    only (:mod:`ray_rlhf.models.packing`), the same (B, L, H) result. Works for ``model``-style decoders (Llama,
    Qwen, Gemma, ...) and GPT-2's ``transformer`` (``get_decoder()`` returns either).
    """
    decoder = lm.get_decoder()
    if packed:
        from ray_rlhf.models.packing import packed_hidden

        return packed_hidden(decoder, input_ids, attention_mask, position_ids)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def attention_implementation(config) -> str | None:
    """The HF attention implementation a learner must load ``config``'s model with, or None (any).

    HF's ``sdpa`` and ``flash_attention_2`` kernels ignore ``attn_logit_softcapping`` (Gemma 2,
    VaultGemma, T5Gemma) and only ``eager`` (and ``flex_attention``) apply it, while vLLM always
    does: with the default ``sdpa`` the learner's log-probs are those of a different model.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "attn_logit_softcapping", None):
        return "eager"
    return None


@torch.no_grad()
def check_output_head(lm: nn.Module, atol: float = 1e-4, seq_len: int = 6) -> float:
    """Raise :class:`OutputHeadMismatch` unless ``output_logits(trunk_hidden(...))`` equals
    ``lm(...).logits`` on a small left-padded batch; return the max absolute difference.

    One forward of 2 x ``seq_len`` tokens each way, in eval mode (dropout off); the model's
    training flag is restored afterwards. Call it once after loading a model of an architecture
    the project has not seen.
    """
    was_training = lm.training
    lm.eval()
    try:
        vocab = lm.get_output_embeddings().weight.shape[0]
        device = lm.get_output_embeddings().weight.device
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, min(vocab, 1000), (2, seq_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # row 1 left-padded by two
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ref = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        ours = output_logits(lm, trunk_hidden(lm, ids, mask, pos))
        real = mask.bool()
        diff = (ref[real] - ours[real]).abs().max().item()
    finally:
        lm.train(was_training)
    if not diff <= atol:
        raise OutputHeadMismatch(
            f"{type(lm).__name__}: output_logits differs from the model's forward by {diff:.3g} (> {atol}); its "
            "forward post-processes the logits in a way ray_rlhf.models.output_head does not know yet -- "
            "add that step to output_logits"
        )
    return diff


# ---------------------------------------------------------------------------------- loading


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names that refer to one shared Parameter, one list per shared tensor (>= 2 names each).

    E.g. ``[["model.embed_tokens.weight", "lm_head.weight"]]`` for a tied Llama.
    """
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def read_hf_state(directory) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face safetensors directory (single file or sharded), by name."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


@torch.no_grad()
def load_hf_state(model: nn.Module, directory) -> None:
    """Load a ``save_pretrained`` directory's tensors into ``model`` strictly, keeping ties.

    For every group of tied names (:func:`tied_parameter_groups`) the checkpoint must hold at
    least one name -- save_pretrained keeps exactly one -- and every name it holds must carry
    the same values; that tensor is then given under all names of the group, so
    ``load_state_dict(strict=True)`` sees no missing key and copies into the one shared
    Parameter (the tie survives). Any other missing or unexpected key raises, as strict loading
    does. Raises ``RuntimeError`` naming the offending keys.
    """
    state = read_hf_state(directory)
    groups = tied_parameter_groups(model)
    for names in groups:
        present = [n for n in names if n in state]
        if not present:
            raise RuntimeError(f"{directory}: none of the tied names {names} is in the checkpoint")
        first = state[present[0]]
        for n in present[1:]:
            if not torch.equal(state[n], first):
                raise RuntimeError(
                    f"{directory}: {n} and {present[0]} are tied in the model but differ in the checkpoint; "
                    "it was saved from an untied model -- set tie_word_embeddings=False in config.json"
                )
        for n in names:
            state[n] = first
    model.load_state_dict(state, strict=True)
    for names in groups:
        if len({id(model.get_parameter(n)) for n in names}) != 1:  # pragma: no cover - copies are in place
            raise RuntimeError(f"tie between {names} was broken by loading")
