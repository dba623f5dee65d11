"""Loading a Hugging Face causal LM for training: float32, dropout off, the attention kernel
that computes what vLLM computes, and a one-time check of the split trunk/head forward."""

from __future__ import annotations

import torch


def load_causal_lm(path: str, device: str) -> torch.nn.Module:
    """A causal LM in float32, eval mode (dropout off: the sampler drew without it), with the
    attention kernel that computes what vLLM computes (Gemma 2's soft-capped attention needs
    ``eager``), checked once: the learner's split trunk/head forward equals the model's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ray_rlhf.models.output_head import attention_implementation, check_output_head

    impl = attention_implementation(AutoConfig.from_pretrained(path))
    kwargs = {"attn_implementation": impl} if impl else {}
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).to(device).eval()
    disable_dropout(lm)
    check_output_head(lm)
    return lm


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of ``model`` off for good, in train mode too (gradient checkpointing needs
    train mode): ``nn.Dropout`` modules get p = 0 and float ``*dropout*`` attributes (attention
    dropout read in forward) become 0."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)
