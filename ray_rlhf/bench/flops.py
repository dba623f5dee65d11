"""FLOP accounting of the learner and this machine's matmul throughput: model FLOPs utilisation.

Model FLOPs of a decoder-only transformer on one sequence of ``L`` tokens (Kaplan et al. 2020,
Table 1; PaLM, Chowdhery et al. 2022, app. B), per layer with hidden ``d``, ``h`` query heads of
size ``d_h``, ``h_kv`` key/value heads and MLP width ``f`` (gated: 3 matrices, else 2):

    projections   2 L d (h d_h + 2 h_kv d_h)  +  2 L (h d_h) d         (q, k, v, o)
    attention     2 * 2 L^2 h d_h / 2                                   (QK^T and AV, causal half)
    MLP           2 L d f * (3 if gated else 2)

plus the LM head ``2 L d V`` (every position, as the learner computes logits at every response
position it scores; prompt positions get no LM head). A forward pass is this sum; a backward is
twice it. Counted over REAL tokens only: padding is waste, and shows up as a lower utilisation.

The learner's step: ``prepare`` = one forward of the reference, plus one of the policy unless the
sampler's log-probs are pi_old (and the policy's trunk when a value head sits on it); ``update`` =
``epochs`` x (forward + backward) of the policy (+ value head, negligible).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated: bool = True

    @classmethod
    def of(cls, config) -> Shape:
        """From a Hugging Face config."""
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = c.hidden_size
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
        gated = getattr(c, "model_type", "") not in ("gpt2", "gpt_neox", "opt", "phi")
        return cls(hidden, c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads, head_dim,
                   inter, c.vocab_size, gated)

    def forward_flops(self, prompt_len: int, response_len: int) -> float:
        """FLOPs of one forward over a sequence whose last ``response_len`` positions get logits."""
        L = prompt_len + response_len
        d, h, hk, dh, f = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
        proj = 2 * L * d * (h * dh + 2 * hk * dh) + 2 * L * h * dh * d
        attn = 2 * L * L * h * dh  # QK^T and AV over the causal half: 2 * (2 L^2 h d_h) / 2
        mlp = 2 * L * d * f * (3 if self.gated else 2)
        return self.layers * (proj + attn + mlp) + 2 * response_len * d * self.vocab


def step_flops(shape: Shape, prompt_lens, response_lens, epochs: int, policy_forward_in_prepare: bool) -> dict:
    """Model FLOPs of one learner step, by phase: ``prepare`` and ``update``."""
    fwd = sum(shape.forward_flops(int(p), int(r)) for p, r in zip(prompt_lens, response_lens))
    prepare = fwd * (2 if policy_forward_in_prepare else 1)
    return {"prepare": prepare, "update": epochs * 3 * fwd, "forward": fwd}


def matmul_peak(shape: Shape, tokens: int, threads: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """This machine's FLOP/s on the learner's own GEMM shapes (tokens x d @ d x f, d x d, d x V),
    with ``threads`` torch threads: the best of ``repeats`` timings of one pass over them."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        d = shape.hidden
        mats = [(tokens, d, shape.intermediate), (tokens, shape.intermediate, d), (tokens, d, shape.heads * shape.head_dim),
                (tokens, d, shape.vocab)]
        pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in mats]
        flops = sum(2 * m * k * n for m, k, n in mats)
        for a, b in pairs:  # warm-up
            a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for a, b in pairs:
                a @ b
            best = min(best, time.perf_counter() - t0)
        return flops / best
    finally:
        torch.set_num_threads(old)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); never assumed, read from /proc."""
    from ray_rlhf.telemetry.cpu import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def learner_flops_of(shape: Shape, epochs: int, policy_forward_in_prepare: bool):
    """A ``flops_of`` for :func:`ray_rlhf.bench.bound.run_bound`: a scored batch -> its step FLOPs."""
    def flops_of(batch) -> dict:
        return step_flops(shape, batch.prompt_lengths, batch.response_lengths, epochs, policy_forward_in_prepare)
    return flops_of


def mfu_summary(per_step: list[dict], peaks: dict[str, float], threads: int, gemm_tokens: int) -> dict:
    """Model FLOPs utilisation of the learner per phase, over the learned steps after the warm-up.

    ``peaks``: this machine's matmul FLOP/s by dtype (:func:`matmul_peak`); utilisation is against
    the float32 one (the learner's dtype on CPU). Also the padded/real token ratio of the update."""
    learned = [r for r in per_step if "flops_update" in r]
    kept = learned[1:] or learned
    peak = peaks["float32"]
    out = {"peaks": peaks, "threads": threads, "gemm_tokens": gemm_tokens, "phases": {}}
    for phase, key_s, key_f in (("prepare", "T_prepare", "flops_prepare"), ("update", "T_update", "flops_update")):
        flops, secs = sum(r[key_f] for r in kept), sum(r[key_s] for r in kept)
        out["phases"][phase] = {"flops_per_step": flops / max(len(kept), 1), "seconds_per_step": secs / max(len(kept), 1),
                                "flops_per_s": flops / secs if secs else 0.0,
                                "mfu": flops / secs / peak if secs else 0.0}
    flops = sum(p["flops_per_step"] for p in out["phases"].values())
    secs = sum(p["seconds_per_step"] for p in out["phases"].values())
    out["learner_mfu"] = flops / secs / peak if secs else 0.0
    out["learner_flops_per_step"] = flops
    real = sum(r.get("real_tokens", 0) for r in kept)
    out["padded_over_real_tokens"] = sum(r.get("padded_tokens", 0) for r in kept) / real if real else float("nan")
    return out
