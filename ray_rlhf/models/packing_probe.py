"""Can this model's attention be confined per sequence in a packed pass? Measured, not assumed.

A one-layer, randomly initialised model of the checkpoint's architecture (its own config, so the
same attention code and position scheme) runs three short rows padded and packed
(:mod:`ray_rlhf.models.packing`); packing works when the real tokens' hidden states agree within
1e-5 (fp32). Architectures whose attention ignores restarting positions (ALiBi biases from the
mask, learned absolute positions with no packed-mask support) fail it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def probe_model(lm: torch.nn.Module, atol: float = 1e-5) -> str | None:
    """None when a packed pass of ``lm`` equals the padded one; else what differed."""
    from ray_rlhf.models.packing import packed_hidden
    from ray_rlhf.models.policy import sequence_inputs

    vocab = int(lm.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(1, min(vocab, 1000), (3, 4), generator=g)
    # real lengths 7, 3, 3: rows 1 and 2 share a packed line (packed_hidden bins by the longest row)
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    response_ids = torch.randint(1, min(vocab, 1000), (3, 3), generator=g)
    response_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    ids, mask, pos = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    decoder = lm.get_decoder()
    try:
        with torch.no_grad():
            padded = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            packed = packed_hidden(decoder, ids, mask, pos)
    except (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError) as e:  # refused by the architecture
        return f"the packed pass failed ({type(e).__name__}: {e})"
    keep = mask.bool()
    diff = float((packed[keep].float() - padded[keep].float()).abs().max())
    return None if diff <= atol else f"packed and padded hidden states differ by {diff:.2e}"


@functools.lru_cache(maxsize=8)
def probe_checkpoint(path: str) -> str | None:
    """:func:`probe_model` on a one-layer random-init model of the checkpoint's config (fp32, sdpa)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(Path(path))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(text, key):
            setattr(text, key, 1)
    if hasattr(text, "layer_types") and text.layer_types:
        text.layer_types = list(text.layer_types)[:1]
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return probe_model(lm)


def resolve_packing(setting: str, path: str | Path) -> bool:
    """``ppo.packing`` as a bool: ``off`` False, ``on`` True (preflight refuses it where the probe
    fails), ``auto`` whether the probe passes for the checkpoint at ``path``."""
    if setting == "off":
        return False
    if setting == "on":
        return True
    return probe_checkpoint(str(path)) is None
