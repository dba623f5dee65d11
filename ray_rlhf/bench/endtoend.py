"""Section 1 (end to end) and section 5 (memory): the real PPO loop, ``ray_rlhf.run.driver.run``.

Phases of one step, in seconds, from the run's ``metrics.jsonl``:

- ``generate`` = ``time/generate``: the pool's rollout of the step's prompts (vLLM actors);
- ``reward`` = ``time/reward``: the reward actor's ``score`` call;
- ``prepare`` = ``ppo/prepare_seconds``: old/reference logprobs, values, GAE, inside the learner;
- ``update`` = ``ppo/update_seconds``: the PPO epochs, inside the learner;
- ``sync`` = ``time/sync``: the weight broadcast to every generator, checksum verify included;
- ``orchestration`` = ``time/step`` minus the five above: Ray calls and transfers around the
  learner, batching, metrics logging.

Multi-turn runs (``env.name`` set): ``generated_tokens`` counts model tokens only (the
``loss_mask`` 1 tokens: response tokens less ``env/observation_tokens``); ``env`` =
``env/seconds``, the environments' wall time inside ``generate`` (its own phase, not subtracted
from ``generate``: under ``env.scheduling=continuous`` it overlaps the engine's work);
``engine_busy_fraction`` = ``perf/engine_busy_fraction``; ``turns_mean`` = ``env/turns_mean``.

Peak memory of every actor is read in the driver's ``on_finish`` hook, before shutdown.

Synchronous runs with full-weight sync (``rollout.max_staleness=0``, no ``lora.sync=adapter``):
the driver's ``on_step_end`` hook also keeps the policy weights each step ended with -- the
weights the generators were verified to hold for the next step's generation -- so that the bound
section can generate each step standalone with the loop's own weights (equal work: same weights,
prompts and seeds). It runs after the step's timings are taken, between steps, and only where
all steps' weights fit in :data:`KEEP_WEIGHTS_BYTES` of the driver's memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from ray_rlhf.bench.common import actor_peak_rss, driver_peak_rss, mean_after_warmup
from ray_rlhf.config.schema import RunConfig
from ray_rlhf.run.driver import run

KEEP_WEIGHTS_BYTES = 4 << 30
"""The most driver memory the kept weights of all steps may take (else none are kept)."""

PHASES = {
    "generate": "time/generate",
    "reward": "time/reward",
    "prepare": "ppo/prepare_seconds",
    "update": "ppo/update_seconds",
    "sync": "time/sync",
}


def phase_row(metrics: dict) -> dict[str, float]:
    """One step's phases (seconds), orchestration being what the named phases leave of the step."""
    row = {name: float(metrics[key]) for name, key in PHASES.items()}
    row["orchestration"] = float(metrics["time/step"]) - sum(row.values())
    row["step"] = float(metrics["time/step"])
    return row


def keeps_weights(cfg: RunConfig) -> bool:
    """Whether each step's generation used exactly the weights the previous step ended with (a
    synchronous loop syncing full weights), so that they can be replayed standalone."""
    return cfg.rollout.max_staleness == 0 and cfg.lora.resolved_sync != "adapter"


def run_endtoend(cfg: RunConfig, weights: dict | None = None) -> dict:
    """Run ``cfg.steps`` PPO steps; return per-step rows, warm-up-skipped means and actor memory.
    ``weights`` (a dict, filled in place where :func:`keeps_weights` and they fit in
    :data:`KEEP_WEIGHTS_BYTES`): step -> the policy's Hugging Face state dict at the end of that
    step (the weights of step + 1's generation)."""
    memory: list[dict] = []
    keep = weights is not None and keeps_weights(cfg)

    def on_step_end(step: int, actors) -> None:
        nonlocal keep
        if not keep or step >= cfg.steps:
            return
        state = ray.get(actors.learners.source.hf_state_dict.remote())
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        if nbytes * (cfg.steps - 1) > KEEP_WEIGHTS_BYTES:
            keep = False
            weights.clear()
        else:
            weights[step] = state

    def on_finish(actors) -> None:
        for i, h in enumerate(actors.pool.handles.values()):
            memory.append({"actor": f"generator-{i}", **actor_peak_rss(h)})
        for i, h in enumerate(actors.learners.ranks):
            memory.append({"actor": "learner" if i == 0 else f"learner-{i}", **actor_peak_rss(h)})
        memory.append({"actor": "reward", **actor_peak_rss(actors.reward)})
        memory.append({"actor": "driver", **driver_peak_rss()})

    out = run(cfg, on_finish=on_finish, on_step_end=on_step_end if keep else None)
    rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summarize(rows, out, memory)


def summarize(rows: list[dict], out, memory: list[dict]) -> dict:
    """Per-step rows and warm-up-skipped means of a run's ``metrics.jsonl`` rows."""
    per_step = []
    multi_turn = bool(rows) and "env/seconds" in rows[0]
    for m in rows:
        r = phase_row(m)
        # the learner's exact count where logged, else the rate times the time
        tokens = float(m.get("ppo/response_tokens", float(m["perf/generated_tokens_per_s"]) * float(m["time/generate"])))
        if multi_turn:  # model tokens only: observation / template tokens are not generated
            tokens -= float(m["env/observation_tokens"])
            r.update(env=float(m["env/seconds"]), turns_mean=float(m["env/turns_mean"]),
                     engine_busy_fraction=float(m.get("perf/engine_busy_fraction", float("nan"))))
        r.update(step_index=int(m["step"]), samples_per_s=float(m["perf/samples_per_s"]),
                 generated_tokens_per_s=tokens / max(float(m["time/generate"]), 1e-9),
                 generated_tokens=tokens,
                 response_length_mean=float(m.get("response/length_mean", 0.0)),
                 sync_seconds_no_verify=float(m["sync/seconds"]), sync_bytes=int(m["sync/bytes"]),
                 padded_token_ratio=float(m.get("perf/padded_token_ratio", float("nan"))))
        per_step.append(r)
    keys = [*PHASES, "orchestration", "step", "samples_per_s", "sync_seconds_no_verify", "response_length_mean",
            "padded_token_ratio"]
    if multi_turn:
        keys += ["env", "turns_mean", "engine_busy_fraction"]
    mean = {k: mean_after_warmup([r[k] for r in per_step]) for k in keys}
    kept = per_step[1:] or per_step
    # tokens/s over the kept steps as a whole (total tokens / total generate time), not a mean of rates
    mean["generated_tokens_per_s"] = sum(r["generated_tokens"] for r in kept) / sum(r["generate"] for r in kept)
    return {"output_dir": str(out), "per_step": per_step, "mean": mean, "multi_turn": multi_turn,
            "weight_bytes": per_step[-1]["sync_bytes"], "memory": memory}
