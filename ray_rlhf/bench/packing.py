"""``ray-rlhf bench --learner-packing``: the learner's update with and without packed sequences.

One plain :class:`~ray_rlhf.learning.learner.Learner` (no Ray, no vLLM) updates on a batch whose
response lengths are long-tailed (lognormal, median ``median`` tokens, sigma ``sigma``, capped at
``rollout.max_new_tokens``), for each micro-batching (``ppo.micro_batch_size`` rows, or a
``ppo.micro_batch_tokens`` budget) with ``ppo.packing`` off and on; it reports padded/real tokens
and the update's wall time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

QUICK = dict(preset="tiny", rows=16, median=12, sigma=1.0, max_new=64, micro_rows=4, budget=256)
FULL = dict(preset="small", rows=64, median=48, sigma=1.0, max_new=512, micro_rows=16, budget=4096)


def lognormal_rollouts(rows: int, median: int, sigma: float, max_new: int, vocab: int, seed: int = 0):
    """A scored :class:`RolloutBatch` of ``rows`` (8-token prompts, 2 samples each) with lognormal response lengths."""
    from ray_rlhf.records import RolloutBatch

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, rows)), 1, max_new).astype(int)
    prompts = [rng.integers(3, vocab, 8).tolist() for _ in range(rows // 2 + 1)]
    responses = [rng.integers(3, vocab, n).tolist() for n in lengths]
    batch = RolloutBatch.from_sequences(
        prompt_index=[i // 2 for i in range(rows)], sample_index=[i % 2 for i in range(rows)],
        prompt=["p"] * rows, response=["r"] * rows, prompt_ids=[prompts[i // 2] for i in range(rows)],
        response_ids=responses, sampler_logprobs=[[-1.0] * n for n in lengths],
        finish_reason=["stop"] * rows, policy_version=[0] * rows, generator_id="bench", reward=rng.random(rows).tolist())
    return batch, lengths


def run(quick: bool, out: Path | None = None, cache_dir: str | None = None) -> dict:
    """The table's rows: for each micro-batching, packing off and on."""
    import torch

    from ray_rlhf.config import load_config
    from ray_rlhf.learning.learner import Learner, LearnerOptions
    from ray_rlhf.models.factory import ensure_model

    p = QUICK if quick else FULL
    cfg = load_config(p["preset"])
    path = ensure_model("policy", p["preset"], Path(cache_dir or Path.home() / ".cache" / "ray-rlhf" / "models"))
    vocab = int(json.loads((path / "config.json").read_text())["vocab_size"])
    batch, lengths = lognormal_rollouts(p["rows"], p["median"], p["sigma"], p["max_new"], vocab)
    rows = []
    for label, mb in ((f"{p['micro_rows']}-row micro-batches", dict(micro_batch_size=p["micro_rows"])),
                      (f"{p['budget']}-token budget", dict(micro_batch_tokens=p["budget"]))):
        for packing in (False, True):
            ppo = cfg.ppo.model_copy(update=dict(epochs=1, minibatch_size=p["rows"], **mb))
            learner = Learner(str(path), ppo, cfg.kl, seed=0, torch_threads=torch.get_num_threads(),
                              options=LearnerOptions(algo=cfg.algo, response_budget=p["max_new"], packing=packing))
            t0 = time.perf_counter()
            stats = learner.step(batch)
            rows.append(dict(micro_batching=label, packing=packing, padded_tokens=stats.padded_tokens,
                             real_tokens=stats.real_tokens, padded_over_real=stats.padded_tokens / stats.real_tokens,
                             step_s=time.perf_counter() - t0))
    result = dict(preset=p["preset"], rows=p["rows"], median=p["median"], sigma=p["sigma"],
                  response_max=int(lengths.max()), table=rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "learner_packing.json").write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    """Markdown table of :func:`run`'s rows."""
    lines = ["| micro-batching | packing | padded/real tokens | learner step (s) |", "|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['micro_batching']} | {'on' if r['packing'] else 'off'} | "
                     f"{r['padded_over_real']:.2f} ({r['padded_tokens']}/{r['real_tokens']}) | {r['step_s']:.1f} |")
    return "\n".join(lines)
