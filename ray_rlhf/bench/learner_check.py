"""The learner on a real GPU, with PyTorch and transformers alone: ``python -m ray_rlhf.bench.learner_check``.

The :class:`~ray_rlhf.learning.learner.Learner` is a plain class (no Ray, no vLLM), so this check
builds it in-process on random-init models of real shapes (Qwen2.5-0.5B and -1.5B configs, no
download), joins a process group of one so that the policy is sharded by FSDP2 with its bf16
mixed-precision policy (fp32 master weights, gradients reduced in fp32) -- the path a GPU cluster
runs at N ranks -- and times the learner's ``prepare`` and ``update`` on a synthetic scored batch
with long-tailed response lengths, for each variant: gradient checkpointing on/off,
``learner.compile`` on/off, sequence packing on/off (``ppo.packing``).

For each it prints tokens per second (real prompt + response tokens the update trains on, per
second of update), model FLOPs utilisation (MFU) of prepare and update against the bf16 matmul
peak it measures on the device first (:func:`device_peak`; model FLOPs counted by
:mod:`ray_rlhf.bench.flops`, real tokens only, recomputation under gradient checkpointing not
counted), and peak memory. It also checks the device path of
:func:`~ray_rlhf.algo.token_logprobs.token_logprobs_and_entropy` (values and gradients) against
plain autograd on the full vocabulary.

``--tiny --device cpu`` runs the same code on a tiny model in seconds (the test suite does);
``--budget-s`` stops starting variants once the time is spent (the rest are listed as skipped),
so the check fits the slot it is given. Results also go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

QWEN25 = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", pad_token_id=151643,
              bos_token_id=151643, eos_token_id=151643)
SHAPES: dict[str, dict] = {
    "0.5b": dict(QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "tiny": dict(QWEN25, vocab_size=512, max_position_embeddings=2048, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
}
"""Qwen2.5 configurations by size (the published config.json values that set the shapes)."""


@dataclass(frozen=True)
class Variant:
    shape: str
    gradient_checkpointing: bool = False
    compile: bool = False
    packing: bool = True

    @property
    def name(self) -> str:
        return (f"{self.shape} gc={'on' if self.gradient_checkpointing else 'off'} "
                f"compile={'on' if self.compile else 'off'} packing={'on' if self.packing else 'off'}")


def variants(shapes: list[str]) -> list[Variant]:
    """Most telling first (the budget may cut the tail): for every shape the plain packed run,
    packing off and gradient checkpointing on; then ``compile`` (slow to warm up) for every shape;
    then the rest of each shape's 2 x 2 x 2 grid."""
    tiers = [[v for s in shapes for v in (Variant(s), Variant(s, packing=False), Variant(s, gradient_checkpointing=True))],
             [Variant(s, compile=True) for s in shapes],
             [Variant(s, gc, c, p) for s in shapes for gc in (False, True) for c in (False, True) for p in (True, False)]]
    out: list[Variant] = []
    for v in (v for tier in tiers for v in tier):
        if v not in out:
            out.append(v)
    return out


# ---------------------------------------------------------------------------------- pieces


def build_lm(shape: str, device: str) -> torch.nn.Module:
    """A random-init Qwen2 causal LM of ``shape`` in float32 on ``device`` (sdpa attention, dropout off)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from ray_rlhf.learning.loading import disable_dropout

    cfg = Qwen2Config(**{k: v for k, v in SHAPES[shape].items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    disable_dropout(lm)
    return lm.eval()


def synthetic_batch(n: int, prompt_len: int, max_response: int, vocab: int, version: int, seed: int = 0):
    """A scored :class:`~ray_rlhf.records.RolloutBatch` of ``n`` sequences: prompts of 1/2 to 1 x
    ``prompt_len`` tokens, responses with a long tail (lognormal, median ``max_response / 8``,
    capped at ``max_response``), 4 samples per prompt, random rewards, sampled at ``version``."""
    from ray_rlhf.records import RolloutBatch

    rng = np.random.default_rng(seed)
    plen = rng.integers(max(1, prompt_len // 2), prompt_len + 1, size=n)
    rlen = np.clip(np.exp(rng.normal(math.log(max_response / 8), 1.0, size=n)).astype(int), 1, max_response)
    ids = lambda k: rng.integers(3, vocab, size=k).tolist()  # noqa: E731
    rlen[0] = max_response  # the tail is there in every batch
    return RolloutBatch.from_sequences(
        prompt_index=[i // 4 for i in range(n)], sample_index=[i % 4 for i in range(n)],
        prompt_ids=[ids(int(k)) for k in plen], response_ids=[ids(int(k)) for k in rlen],
        sampler_logprobs=[(-rng.random(int(k)) * 3).tolist() for k in rlen], prompt=["p"] * n, response=["r"] * n,
        finish_reason=["stop"] * n, policy_version=[version] * n, generator_id=["g"] * n, columns={},
        reward=rng.normal(size=n).tolist())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_peak(device: str, dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 10) -> float:
    """The device's matmul FLOP/s on random ``n x n x n`` products of ``dtype`` (best of ``repeats``
    after warm-up): the peak MFU is measured against, not a datasheet number."""
    if not device.startswith("cuda"):
        n = min(n, 512)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def check_token_logprobs(device: str, rows: int = 1024, vocab: int = 151936) -> dict:
    """``token_logprobs_and_entropy`` on ``device`` against plain autograd (log_softmax, full
    tensors, float64 on the same logits): worst absolute difference of log-probs, entropies and
    the logits' gradient of ``sum(logp) + 0.1 sum(H)``."""
    from ray_rlhf.algo.token_logprobs import token_logprobs_and_entropy

    if not device.startswith("cuda"):
        rows, vocab = min(rows, 64), min(vocab, 1000)
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=device, generator=g) * 3).requires_grad_(True)
    tokens = torch.randint(0, vocab, (rows,), device=device, generator=g)
    logp, ent = token_logprobs_and_entropy(logits, tokens)
    (logp.sum() + 0.1 * ent.sum()).backward()
    ours = logits.grad.detach().clone()
    ref_logits = logits.detach().double().requires_grad_(True)
    lsm = torch.log_softmax(ref_logits, dim=-1)
    ref_logp = lsm.gather(-1, tokens[:, None]).squeeze(-1)
    ref_ent = -(lsm.exp() * lsm).sum(-1)
    (ref_logp.sum() + 0.1 * ref_ent.sum()).backward()
    out = {"rows": rows, "vocab": vocab,
           "logprob_max_abs_diff": float((logp.double() - ref_logp).abs().max()),
           "entropy_max_abs_diff": float((ent.double() - ref_ent).abs().max()),
           "grad_max_abs_diff": float((ours.double() - ref_logits.grad).abs().max())}
    out["ok"] = out["logprob_max_abs_diff"] < 1e-4 and out["entropy_max_abs_diff"] < 1e-4 and out["grad_max_abs_diff"] < 1e-5
    return out


# ---------------------------------------------------------------------------------- one variant


def learner_options(v: Variant, dtype: str, response_budget: int):
    """The learner's options for ``v`` (FSDP2 at one rank); ``packing`` only where the learner has it."""
    from ray_rlhf.learning.learner import LearnerOptions

    kw = dict(strategy="fsdp", world_size=1, rank=0, dtype=dtype, gradient_checkpointing=v.gradient_checkpointing,
              compile=v.compile, response_budget=response_budget)
    if "packing" in {f.name for f in fields(LearnerOptions)}:
        kw["packing"] = v.packing
    elif v.packing:
        raise NotImplementedError("this learner has no sequence packing (LearnerOptions.packing)")
    return LearnerOptions(**kw)


def run_variant(v: Variant, args, peak: float) -> dict:
    """Build the learner for ``v``, one warm-up step, then ``args.steps`` timed steps."""
    from ray_rlhf.bench.flops import Shape, step_flops
    from ray_rlhf.config.training import KLConfig, PPOConfig
    from ray_rlhf.learning.learner import Learner

    device = args.device
    dtype = "bfloat16" if device.startswith("cuda") else args.cpu_dtype
    lm = build_lm(v.shape, device)
    params = sum(p.numel() for p in lm.parameters())
    ppo = PPOConfig(epochs=1, minibatch_size=args.minibatch, micro_batch_tokens=args.micro_batch_tokens, lr=1e-6)
    learner = Learner("random-init", ppo, KLConfig(), device=device, lm=lm,
                      options=learner_options(v, dtype, args.max_response))
    learner.join_group(*learner.group_address())
    shape = Shape.of(lm.config)
    rows = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    for i in range(args.steps + 1):
        batch = synthetic_batch(args.sequences, args.prompt_len, args.max_response, lm.config.vocab_size,
                                version=learner.version, seed=i)
        _sync(device)
        stats = learner.step(batch)
        _sync(device)
        fl = step_flops(shape, batch.prompt_lengths, batch.response_lengths, epochs=1, policy_forward_in_prepare=True)
        rows.append({"prepare_s": stats.prepare_seconds, "update_s": stats.update_seconds,
                     "real_tokens": int(batch.prompt_lengths.sum() + batch.response_lengths.sum()),
                     "padded_tokens": stats.padded_tokens, "update_real_tokens": stats.real_tokens,
                     "flops_prepare": fl["prepare"], "flops_update": fl["update"]})
        if i == 0:
            warm_s = time.perf_counter() - t_build
        if i == 0 and args.profile:
            profile_step(learner, args, lm.config.vocab_size)
            args.profile = False  # the first variant only
    timed = rows[1:]
    prep_s, upd_s = sum(r["prepare_s"] for r in timed), sum(r["update_s"] for r in timed)
    out = {"variant": v.name, **asdict(v), "params": params, "dtype": dtype, "steps": len(timed),
           "first_step_s": warm_s,
           "prepare_s": prep_s / len(timed), "update_s": upd_s / len(timed),
           "update_tokens_per_s": sum(r["real_tokens"] for r in timed) / upd_s,
           "mfu_prepare": sum(r["flops_prepare"] for r in timed) / prep_s / peak,
           "mfu_update": sum(r["flops_update"] for r in timed) / upd_s / peak,
           "padded_over_real": sum(r["padded_tokens"] for r in timed) / max(1, sum(r["update_real_tokens"] for r in timed)),
           "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.startswith("cuda") else float("nan")}
    out["mfu_step"] = (sum(r["flops_prepare"] + r["flops_update"] for r in timed) / (prep_s + upd_s) / peak)
    del learner, lm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def profile_step(learner, args, vocab: int) -> None:
    """One extra step under ``torch.profiler``: where the host and the device spend it (top
    operators by self device time and by self host time), and the device's busy share of the step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    batch = synthetic_batch(args.sequences, args.prompt_len, args.max_response, vocab, version=learner.version, seed=99)
    _sync(args.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        stats = learner.step(batch)
        _sync(args.device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e6
    print(f"profiled step: {wall:.2f} s wall (prepare {stats.prepare_seconds:.2f}, update {stats.update_seconds:.2f}); "
          f"device kernels {busy:.2f} s ({busy / wall:.0%} busy)", flush=True)
    device_key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(events.table(sort_by=device_key, row_limit=18, max_name_column_width=60), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    head = ("| variant | params | first step s | prepare s | update s | update tok/s | MFU prepare | MFU update | "
            "MFU step | padded/real | peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} |" + " |" * 9)
            continue
        lines.append(f"| {r['variant']} | {r['params'] / 1e9:.2f} B | {r['first_step_s']:.1f} | {r['prepare_s']:.3f} | "
                     f"{r['update_s']:.3f} | {r['update_tokens_per_s']:,.0f} | {r['mfu_prepare']:.3f} | "
                     f"{r['mfu_update']:.3f} | {r['mfu_step']:.3f} | {r['padded_over_real']:.2f} | "
                     f"{r['peak_memory_gib']:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_rlhf.bench.learner_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (the CPU mode the tests run)")
    p.add_argument("--shapes", default="1.5b,0.5b", help="comma-separated: 0.5b, 1.5b, tiny")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--sequences", type=int, default=64, help="sequences per step")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-response", type=int, default=2048)
    p.add_argument("--minibatch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no variant after this many seconds")
    p.add_argument("--variants", type=int, default=0, help="at most this many variants (0: all)")
    p.add_argument("--only", default="", help="only variants whose name contains this (e.g. 'packing=off')")
    p.add_argument("--cpu-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="profile one step of the first variant")
    return p


def main(argv: list[str] | None = None) -> int:
    import os
    import warnings

    # lengths change every micro-batch: without expandable segments the caching allocator frees
    # and re-allocates its large blocks (a synchronising cudaMalloc each); set before CUDA starts
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    # FSDP2 (torch >= 2.12) warns that the root module returns views; the learner does no in-place op on its outputs
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    if args.tiny:
        args.shapes, args.sequences, args.prompt_len, args.max_response = "tiny", 8, 16, 48
        args.minibatch, args.micro_batch_tokens, args.steps = 4, 128, min(args.steps, 2)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("learner_check: --device cuda but torch sees no GPU; use --device cpu (with --tiny)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = device_peak(args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    print(f"device: {name}; torch {torch.__version__}; measured matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s ({'bf16' if args.device.startswith('cuda') else 'fp32'})", flush=True)
    tl = check_token_logprobs(args.device)
    print(f"token_logprobs vs autograd ({tl['rows']} x {tl['vocab']}): logp {tl['logprob_max_abs_diff']:.2e}, "
          f"entropy {tl['entropy_max_abs_diff']:.2e}, grad {tl['grad_max_abs_diff']:.2e} -> "
          f"{'ok' if tl['ok'] else 'MISMATCH'}", flush=True)
    todo = [v for v in variants(args.shapes.split(",")) if args.only in v.name]
    if args.variants:
        todo = todo[: args.variants]
    results: list[dict] = []
    for v in todo:
        if time.perf_counter() - t0 > args.budget_s:
            results.append({"variant": v.name, "error": "skipped (time budget)"})
            continue
        try:
            r = run_variant(v, args, peak)
        except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
            r = {"variant": v.name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        finally:
            leave_group()
        results.append(r)
        print(json.dumps(r), flush=True)
    print(table(results), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "peak_flops": peak, "token_logprobs": tl,
                       "args": vars(args), "results": results}, f, indent=1)
    failed = [r for r in results if "error" in r and not r["error"].startswith("skipped")]
    return 1 if failed or not tl["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
