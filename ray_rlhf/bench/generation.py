"""Section 3: generation tokens/s -- in the PPO loop vs standalone vLLM vs transformers ``generate``.

Same prompts, sampling parameters and seeds; EOS is allowed, so response lengths vary (the rate is
total response tokens / wall time). In a synchronous run the standalone generation of each step
uses the weights the loop generated that step with (see :mod:`ray_rlhf.bench.bound`), so both do
the same work: ``same_weights_steps`` counts those steps and ``equal_tokens_steps`` the ones whose
token counts agree exactly. The transformers baseline runs
:func:`ray_rlhf.bench.hf_sampler.hf_generate` in as many actors, with the same CPU share each, as the
vLLM generators, each on its share of the prompts; timed from the driver like standalone vLLM.
"""

from __future__ import annotations

import math
import time

import ray

from ray_rlhf.records import PromptItem, SamplingSpec


class HFSampler:
    """transformers ``generate`` in an actor: the baseline of the vLLM engine."""

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.generate([PromptItem(0, "Hello")], SamplingSpec(n=1, max_new_tokens=2, seed=0))  # warm-up

    def generate(self, prompts: list[PromptItem], sampling: SamplingSpec) -> int:
        """Response tokens generated for ``prompts`` (``sampling.n`` samples each)."""
        from ray_rlhf.bench.hf_sampler import hf_generate

        return len(hf_generate(self.model, self.tokenizer, prompts, sampling).response_ids)

    def ping(self) -> bool:
        return True


def start_hf(cfg, model_path, n: int) -> list:
    cls = ray.remote(num_cpus=cfg.generators.num_cpus)(HFSampler)
    return [cls.remote(str(model_path)) for _ in range(n)]


def hf_tokens_per_s(samplers: list, batches) -> dict:
    """Per batch: tokens and wall seconds of ``hf_generate`` split over ``samplers``."""
    ray.get([s.ping.remote() for s in samplers])
    per_step = []
    for step, batch, sampling in batches:
        k = math.ceil(len(batch) / len(samplers))
        t0 = time.perf_counter()
        tokens = sum(ray.get([s.generate.remote(batch[i * k:(i + 1) * k], sampling) for i, s in enumerate(samplers)]))
        per_step.append({"step_index": step, "tokens": tokens, "seconds": time.perf_counter() - t0})
    return {"per_step": per_step,
            "tokens_per_s": sum(r["tokens"] for r in per_step) / sum(r["seconds"] for r in per_step)}


def compare(e2e: dict, bound: dict, hf: dict) -> dict:
    """The three rates and their ratios; vLLM vs transformers on the same steps only."""
    steps = {r["step_index"] for r in hf["per_step"]}
    same = [r for r in bound["per_step"] if r["step_index"] in steps]
    vllm_same = sum(r["tokens"] for r in same) / sum(r["G"] for r in same)
    in_loop, standalone = e2e["mean"]["generated_tokens_per_s"], bound["standalone_tokens_per_s"]
    # Same step = same prompts and seeds, and the loop's weights where the bound replayed them.
    g_by_step = {r["step_index"]: r for r in bound["per_step"]}
    pairs = [(r, g_by_step[r["step_index"]]) for r in e2e["per_step"][1:] if r["step_index"] in g_by_step]
    return {
        "in_loop_tokens_per_s": in_loop,
        "standalone_vllm_tokens_per_s": standalone,
        "hf_generate_tokens_per_s": hf["tokens_per_s"],
        "standalone_vllm_tokens_per_s_on_hf_steps": vllm_same,
        "in_loop_over_standalone": in_loop / standalone,
        "standalone_seconds_over_in_loop_seconds": sum(g["G"] for _, g in pairs) / sum(r["generate"] for r, _ in pairs),
        "per_step_tokens_per_s": [
            {"step_index": r["step_index"], "in_loop": r["generated_tokens"] / r["generate"],
             "standalone": g["tokens"] / g["G"], "in_loop_tokens": r["generated_tokens"], "standalone_tokens": g["tokens"],
             "same_weights": bool(g.get("loop_weights"))}
            for r, g in pairs],
        "same_weights_steps": sum(bool(g.get("loop_weights")) for _, g in pairs),
        "equal_tokens_steps": sum(round(r["generated_tokens"]) == g["tokens"] for r, g in pairs),
        "compared_steps": len(pairs),
        "vllm_over_hf": vllm_same / hf["tokens_per_s"],
        "hf_steps": sorted(steps),
        "hf_per_step": hf["per_step"],
    }
