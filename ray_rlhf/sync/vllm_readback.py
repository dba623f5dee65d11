"""Read the weights a vLLM engine actually computes with, back in Hugging Face naming.

Runs inside the vLLM worker via ``llm.collective_rpc(engine_hf_state_dict)``. Why this is needed:

- vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``;
- vLLM's CPU backend repacks every linear weight after loading (oneDNN handle or sgl-kernel
  packed blob captured in ``layer.cpu_linear``) and leaves ``layer.weight`` as an EMPTY tensor, so
  ``named_parameters()`` shows ``torch.Size([0])`` for all of them;
- ``reload_weights`` silently keeps the OLD weights of a layer that received none of its tensors
  (only a log warning) and leaves UNINITIALISED memory in the part of a fused layer that received
  only some (e.g. ``v_proj`` missing -> garbage rows in ``qkv_proj``, no warning at all).

So the read-back probes the packed kernel itself: ``layer.cpu_linear(I, w, None)`` with ``I`` an
identity block returns rows of ``W^T`` -- exactly, because each output element is ``w * 1`` plus
exact zeros (checked bit-for-bit against the checkpoint on this machine for float32; the checksum
also maps ``-0.0`` and subnormals to ``0`` in case a kernel flushes them). Fused tensors are split
by the layer's ``output_sizes`` and renamed through the model's ``packed_modules_mapping``;
embedding/LM-head rows padded beyond ``vocab_size`` are trimmed; a tied LM head is reported under
``lm_head.weight`` as well.

Limits: tensor_parallel_size 1 (each rank holds shards otherwise), dense models (MoE expert
stacks are not mapped back), unquantised weights. On GPU the weights are not repacked and are
read directly.
"""

from __future__ import annotations

import torch

_PROBE_ROWS = 1024
"""Identity rows per probe call: bounds the probe's memory to 1024 x in_features."""


@torch.no_grad()
def _linear_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight a CPU-repacked linear layer computes with."""
    w = layer.weight
    k = int(layer.input_size_per_partition)
    dtype = getattr(layer, "params_dtype", None) or w.dtype
    cols = []
    for start in range(0, k, _PROBE_ROWS):
        rows = min(_PROBE_ROWS, k - start)
        x = torch.zeros(rows, k, dtype=dtype)
        x[:, start : start + rows] = torch.eye(rows, dtype=dtype)
        cols.append(layer.cpu_linear(x, w, None))  # (rows, out) = I_block @ W^T
    return torch.cat(cols, dim=0).t().contiguous()


def engine_hf_state_dict(worker) -> dict[str, torch.Tensor]:
    """``collective_rpc`` target: the worker model's weights as a Hugging Face state dict."""
    model = worker.model_runner.model
    hf_config = worker.model_runner.model_config.hf_config
    vocab = int(getattr(hf_config, "vocab_size", 0) or 0)
    dtype = worker.model_runner.model_config.dtype
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    out: dict[str, torch.Tensor] = {}
    for pname, param in model.named_parameters():
        mod_name, _, attr = pname.rpartition(".")
        layer = model.get_submodule(mod_name)
        if attr == "weight" and param.numel() == 0 and hasattr(layer, "cpu_linear"):
            t = _linear_weight(layer)
        else:
            t = param.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # e.g. a bias the CPU kernel keeps in float32; lossless back-cast
        parent, _, short = mod_name.rpartition(".")
        if short in packed:
            sizes = list(getattr(layer, "output_sizes", []))
            subs = packed[short]
            if len(sizes) != len(subs) or sum(sizes) != t.shape[0]:
                raise RuntimeError(f"cannot split {pname} {tuple(t.shape)} into {subs} by {sizes}")
            for sub, part in zip(subs, torch.split(t, sizes, dim=0)):
                out[f"{parent}.{sub}.{attr}" if parent else f"{sub}.{attr}"] = part
            continue
        if vocab and (mod_name.endswith("embed_tokens") or mod_name.endswith("lm_head")) and t.shape[0] > vocab:
            t = t[:vocab]
        out[pname] = t
    if getattr(hf_config, "tie_word_embeddings", False) and "lm_head.weight" not in out:
        emb = next((v for k, v in out.items() if k.endswith("embed_tokens.weight")), None)
        if emb is not None:
            out["lm_head.weight"] = emb
    return out
