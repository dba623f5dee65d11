"""Targets, ``results.md`` (Markdown tables) and the PNG plots, from the ``results.json`` dict."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ray_rlhf.algo.registry import get_estimator  # noqa: E402

MiB = 2**20
PHASE_ORDER = ("generate", "reward", "prepare", "update", "sync", "orchestration")


# ---------------------------------------------------------------- targets

def _target(name: str, value: float, goal: float, higher_is_better: bool, why: str) -> dict:
    met = value >= goal if higher_is_better else value <= goal
    margin = value - goal if higher_is_better else goal - value
    return {"name": name, "value": value, "goal": goal, "comparison": ">=" if higher_is_better else "<=",
            "met": bool(met), "margin": margin, "why": "" if met else why}


def _same_work(gen: dict) -> str:
    """How equal the in-loop and standalone generation's work was (an older ``results.json``: the
    standalone side had the initial weights)."""
    if "same_weights_steps" not in gen:
        return "standalone generation used the initial weights"
    return (f"standalone generation replayed the loop's weights on {gen['same_weights_steps']} of "
            f"{gen['compared_steps']} compared steps, with equal token counts on {gen['equal_tokens_steps']}")


def targets(res: dict) -> list[dict]:
    cfg, e2e, b, gen = res["config"], res["endtoend"]["mean"], res["bound"], res["generation"]
    n_shards = -(-cfg["prompts_per_step"] // cfg["shard_prompts"])
    gaps = {"generation": e2e["generate"] - b["G"], "learner": e2e["prepare"] + e2e["update"] - b["T"],
            "weight sync": e2e["sync"] - b["S"], "reward": e2e["reward"] - b["R"],
            "orchestration": e2e["orchestration"]}
    worst = max(gaps, key=gaps.get)
    return [
        _target("in-loop generation / standalone vLLM", gen["in_loop_over_standalone"], 0.95, True,
                f"per generate call the loop takes {1 / gen['standalone_seconds_over_in_loop_seconds']:.2f}x the "
                f"standalone time but yields {e2e['response_length_mean']:.1f} tokens per response vs "
                f"{b['mean_response_length']:.1f} ({_same_work(gen)}; a batch runs to its longest "
                f"response); the loop also sends {n_shards} shards of {cfg['shard_prompts']} prompts "
                f"to {cfg['generators']} engines vs one shard per engine, on CPUs shared with other jobs"),
        _target("efficiency (G+R+T+S) / step time", b["efficiency"], 0.90, True,
                f"largest excess over the bound: {worst} +{gaps[worst]:.3f} s/step "
                + ", ".join(f"{k} {v:+.3f}" for k, v in gaps.items() if k != worst)),
        _target(f"weight sync / step time ({cfg['preset']})", e2e["sync"] / e2e["step"], 0.02, False,
                f"sync {e2e['sync']:.3f} s/step of which checksum verify "
                f"{e2e['sync'] - e2e['sync_seconds_no_verify']:.3f} s; transfer+load alone is "
                f"{e2e['sync_seconds_no_verify'] / e2e['step']:.1%} of the step"),
        *_learner_targets(res),
        *_overlap_targets(res),
        _target("vLLM / transformers generate", gen["vllm_over_hf"], 1.5, True,
                f"at {res['model_params'] / 1e6:.1f} M parameters each token costs little compute, so per-step "
                "engine overhead (scheduling, sampling, detokenizing) weighs as much as the model itself"),
    ]


def _overlap_targets(res: dict) -> list[dict]:
    """Asynchronous PPO on disjoint cores: near max(G, T), and clearly faster than synchronous."""
    ov = res.get("overlap")
    if not ov:
        return []
    return [
        _target("async step / max(G, T)", ov["async_over_max_G_T"], 1.15, False,
                f"async {ov['async']['step']:.2f} s/step vs max(G, T) = {ov['max_G_T']:.2f} s"),
        _target("sync step / async step", ov["speedup"], 1.3, True,
                f"ideal (G+T)/max(G,T) = {ov['G_plus_T'] / ov['max_G_T']:.2f}x with G = {ov['G']:.2f} s, T = {ov['T']:.2f} s"),
    ]


def _learner_targets(res: dict) -> list[dict]:
    """The step-speed targets: learner MFU, reward share, everything outside generation and the
    learner's FLOPs (at the measured peak), and (sampler log-probs, no trunk value) prepare."""
    e2e, mfu, cfg = res["endtoend"]["mean"], res.get("mfu"), res["config"]
    if not mfu:
        return []
    peak = mfu["peaks"]["float32"]
    at_peak = mfu["learner_flops_per_step"] / peak
    outside = (e2e["step"] - e2e["generate"] - at_peak) / e2e["step"]
    ph = mfu["phases"]
    rows = [
        _target("learner MFU (fp32, prepare + update)", mfu["learner_mfu"], 0.75, True,
                f"prepare {ph['prepare']['mfu']:.2f}, update {ph['update']['mfu']:.2f} of "
                f"{peak / 1e9:.0f} GFLOP/s on {mfu['threads']} threads; padded/real tokens "
                f"{mfu['padded_over_real_tokens']:.2f}"),
        _target("reward / step time", e2e["reward"] / e2e["step"], 0.01, False,
                f"reward {e2e['reward']:.3f} s/step"),
        _target("outside generation and learner FLOPs / step time", outside, 0.05, False,
                f"step {e2e['step']:.2f} s - generate {e2e['generate']:.2f} s - learner FLOPs at peak "
                f"{at_peak:.2f} s: sync {e2e['sync']:.2f}, reward {e2e['reward']:.2f}, orchestration "
                f"{e2e['orchestration']:.2f}, learner below peak {e2e['prepare'] + e2e['update'] - at_peak:.2f}"),
    ]
    if cfg.get("old_logprobs_from_sampler") and not get_estimator(cfg.get("estimator", "gae")).uses_critic:
        one_ref = ph["prepare"]["flops_per_step"] / peak / max(ph["update"]["mfu"], 1e-9)
        rows.append(_target("prepare / one reference pass (sampler log-probs)", ph["prepare"]["seconds_per_step"]
                            / one_ref, 1.0, False, "prepare runs more than the reference forward"))
    return rows


# ---------------------------------------------------------------- markdown

def _table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(res: dict) -> str:
    cfg, e2e, b, gen = res["config"], res["endtoend"]["mean"], res["bound"], res["generation"]
    bound_of = {"generate": b["G"], "reward": b["R"], "prepare": b["T_prepare"], "update": b["T_update"],
                "sync": b["S"], "orchestration": 0.0}
    out = [
        f"# ray-rlhf benchmark ({res['mode']} mode, preset `{cfg['preset']}`)",
        "",
        f"{res['timestamp']}; {res['machine']}; {cfg['steps']} PPO steps of {cfg['prompts_per_step']} prompts x "
        f"{cfg['samples_per_prompt']} samples, up to {cfg['max_new_tokens']} new tokens, {cfg['generators']} "
        f"generators. Per-step numbers are means over steps 2..{cfg['steps']} (step 1 is warm-up, skipped).",
        "",
        "## End to end",
        "",
        _table(["samples/s", "generated tokens/s", "s/step"],
               [[e2e["samples_per_s"], e2e["generated_tokens_per_s"], e2e["step"]]]),
        "",
        _table(["phase", "s/step", "share of step", "standalone (bound)"],
               [[p, e2e[p], f"{e2e[p] / e2e['step']:.1%}", bound_of[p]] for p in PHASE_ORDER]
               + [["step", e2e["step"], "100%", b["sum"]]]),
        "",
        *multiturn_md(res),
        "## Bound",
        "",
        _table(["G", "R", "T", "S", "G+R+T+S", "step", "efficiency", "max(G,T)", "max(G,T)/step"],
               [[b["G"], b["R"], b["T"], b["S"], b["sum"], b["step_seconds"], b["efficiency"],
                 b["overlap_bound"], b["efficiency_vs_overlap"]]]),
        "",
        f"S = {b['weight_bytes'] / MiB:.1f} MiB / {b['copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s memory-copy bandwidth.",
        "",
        "## Generation",
        "",
        _table(["path", "tokens/s", "vs standalone vLLM"],
               [["in the PPO loop", gen["in_loop_tokens_per_s"], gen["in_loop_over_standalone"]],
                ["standalone vLLM", gen["standalone_vllm_tokens_per_s"], 1.0],
                ["transformers generate", gen["hf_generate_tokens_per_s"],
                 gen["hf_generate_tokens_per_s"] / gen["standalone_vllm_tokens_per_s_on_hf_steps"]]]),
        "",
        f"vLLM / transformers on the same steps {gen['hf_steps']}: {gen['vllm_over_hf']:.2f}x. "
        f"Seconds per generate call, standalone / in the loop (same prompts and seeds): "
        f"{gen['standalone_seconds_over_in_loop_seconds']:.2f}; mean response length {e2e['response_length_mean']:.1f} "
        f"tokens in the loop, {b['mean_response_length']:.1f} standalone; {_same_work(gen)}.",
        "",
        _table(["step", "in-loop tokens/s", "standalone tokens/s", "in-loop tokens", "standalone tokens",
                "loop's weights"],
               [[r["step_index"], r["in_loop"], r["standalone"], int(r["in_loop_tokens"]), r["standalone_tokens"],
                 "yes" if r.get("same_weights") else "no (initial)"] for r in gen["per_step_tokens_per_s"]]),
        "",
        "## Weight sync",
        "",
        _table(["model", "params (M)", "MiB", "backend", "generators", "s/sync", "GB/s delivered"],
               [[r["model"], r["params"] / 1e6, r["bytes"] / MiB, r["backend"], r["generators"], r["seconds"],
                 r["bytes_per_s"] / 1e9] for r in res["weight_sync"]]),
        "",
        *_mfu_md(res),
        *_sweep_md(res),
        *_overlap_md(res),
        "## Peak memory (resident)",
        "",
        _table(["actor", "pid", "peak RSS (MiB)"],
               [[m["actor"], m["pid"], m["peak_rss_bytes"] / MiB] for m in res["memory"]]),
        "",
        "## Targets",
        "",
        _table(["target", "value", "goal", "met", "margin", "why (when missed)"],
               [[t["name"], t["value"], f"{t['comparison']} {t['goal']}", "met" if t["met"] else "MISSED",
                 f"{t['margin']:+.3f}", t["why"]] for t in res["targets"]]),
        "",
    ]
    return "\n".join(out)


def _mfu_md(res: dict) -> list[str]:
    mfu = res.get("mfu")
    if not mfu:
        return []
    peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in mfu["peaks"].items())
    return ["## Learner FLOPs and MFU", "",
            _table(["phase", "GFLOP/step", "s/step", "GFLOP/s", "MFU (fp32)"],
                   [[ph, v["flops_per_step"] / 1e9, v["seconds_per_step"], v["flops_per_s"] / 1e9, v["mfu"]]
                    for ph, v in mfu["phases"].items()]
                   + [["learner", mfu["learner_flops_per_step"] / 1e9,
                       sum(v["seconds_per_step"] for v in mfu["phases"].values()), "", mfu["learner_mfu"]]]),
            "",
            f"Matmul peak at the learner's shapes ({mfu['gemm_tokens']} tokens per GEMM, {mfu['threads']} threads): "
            f"{peaks}. Model FLOPs count real tokens only (attention and LM head included; "
            f"`ray_rlhf/bench/flops.py`); padded/real tokens in the update: {mfu['padded_over_real_tokens']:.3f}.", ""]


def _overlap_md(res: dict) -> list[str]:
    ov = res.get("overlap")
    if not ov:
        return []
    rows = [[name, ov[key]["step"], ov[key]["samples_per_s"], ov[key]["generate"], ov[key]["learner"],
             ov[key]["step"] / ov["G_plus_T"], ov[key]["step"] / ov["max_G_T"]]
            for name, key in (("synchronous (max_staleness=0)", "sync"), ("asynchronous (max_staleness=1)", "async"))]
    return ["## Synchronous vs asynchronous PPO (disjoint cores)", "",
            _table(["loop", "s/step", "samples/s", "generate s", "learner s", "step / (G+T)", "step / max(G,T)"], rows),
            "", f"Learner pinned to cores {ov['learner_cores']}, generators to {ov['generator_cores']}; G = "
            f"{ov['G']:.2f} s and T = {ov['T']:.2f} s from the synchronous run. Asynchronous speed-up "
            f"{ov['speedup']:.2f}x (ideal (G+T)/max(G,T) = {ov['G_plus_T'] / ov['max_G_T']:.2f}x).", ""]


def multiturn_md(res: dict) -> list[str]:
    """Multi-turn runs (``env.name`` set): the environment as its own phase, the engine's busy fraction."""
    if not res["endtoend"].get("multi_turn"):
        return []
    e2e, scheduling = res["endtoend"]["mean"], res["config"].get("env_scheduling", "turns")
    return ["## Multi-turn rollouts", "",
            _table(["env.scheduling", "model tokens/s", "generate s/step", "environment s/step",
                    "environment / generate", "engine busy fraction", "turns / trajectory"],
                   [[scheduling, e2e["generated_tokens_per_s"], e2e["generate"], e2e["env"],
                     f"{e2e['env'] / e2e['generate']:.1%}", e2e["engine_busy_fraction"], e2e["turns_mean"]]]),
            "", "Tokens per second count model tokens only (`loss_mask` 1), here and in every table below. "
            "Environment time is the wall time inside `reset`/`step` calls (overlapping calls once); it lies "
            "within `generate` and, under `env.scheduling=continuous`, overlaps the engine's work. Engine busy "
            "fraction: the share of the rollouts' wall time the engine had turns to sample. The transformers "
            "baseline samples single turns.", ""]


def sweep_row(value: str, e2e: dict, means: tuple[str, ...]) -> dict:
    """One sweep value's row from its end-to-end section: the step means (after warm-up) named in
    ``means``, the learner's step (``prepare + update``, s), the learner rank 0's peak RSS (bytes,
    ``VmHWM``), and the bytes one weight sync sends (``sync/bytes``: the full model, or with
    ``lora.sync=adapter`` the adapters)."""
    learner = next((m for m in e2e.get("memory", []) if m["actor"] == "learner"), {})
    row = {"value": value, **{k: e2e["mean"][k] for k in means}}
    row.update(learner_step=row["prepare"] + row["update"], learner_peak_rss_bytes=learner.get("peak_rss_bytes", 0),
               sync_bytes=int(e2e["weight_bytes"]))
    return row


def _sweep_md(res: dict) -> list[str]:
    sw = res.get("sweep")
    if not sw:
        return []
    multi = "engine_busy_fraction" in sw["rows"][0]
    extra = ["environment s", "engine busy"] if multi else []
    return [f"## Sweep of `{sw['key']}`", "",
            "Means per step after the warm-up step; learner = prepare + update; learner RSS = the learner "
            "rank 0's peak resident memory; sync = `time/sync` (verify included), its bytes `sync/bytes`.", "",
            _table([sw["key"], "samples/s", "tokens/s", "s/step", "generate", "learner", "learner RSS MiB", "sync",
                    "sync bytes", "speed-up", *extra],
                   [[r["value"], r["samples_per_s"], r["generated_tokens_per_s"], r["step"], r["generate"],
                     r["prepare"] + r["update"], r.get("learner_peak_rss_bytes", 0) / MiB, r["sync"],
                     f"{r['sync_bytes']:,}" if "sync_bytes" in r else "", r["speedup"],
                     *([r["env"], r["engine_busy_fraction"]] if multi else [])] for r in sw["rows"]]), ""]


# ---------------------------------------------------------------- plots

def plots(res: dict, out: Path) -> list[str]:
    e2e, b, gen = res["endtoend"]["mean"], res["bound"], res["generation"]
    files = []

    fig, ax = plt.subplots(figsize=(7, 4))
    left = 0.0
    for i, p in enumerate(PHASE_ORDER):
        ax.barh("PPO step", e2e[p], left=left, label=p, color=f"C{i}")
        left += e2e[p]
    left = 0.0
    for name, colour in (("G", "C0"), ("R", "C1"), ("T", "C2"), ("S", "C4")):
        ax.barh("bound G+R+T+S", b[name], left=left, label=f"bound {name}", hatch="//", alpha=0.6, color=colour)
        left += b[name]
    ax.set_xlabel("seconds per step")
    ax.set_title(f"Where a step goes (efficiency {b['efficiency']:.2f})")
    ax.legend(fontsize=7, ncol=2)
    files.append(_save(fig, out / "phases.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["in loop", "standalone vLLM", "transformers"]
    vals = [gen["in_loop_tokens_per_s"], gen["standalone_vllm_tokens_per_s"], gen["hf_generate_tokens_per_s"]]
    ax.bar(names, vals, color=["tab:blue", "tab:green", "tab:gray"])
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Generation throughput")
    files.append(_save(fig, out / "generation.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in sorted({r["backend"] for r in res["weight_sync"]}):
        for n in sorted({r["generators"] for r in res["weight_sync"]}):
            rows = sorted((r for r in res["weight_sync"] if r["backend"] == backend and r["generators"] == n),
                          key=lambda r: r["bytes"])
            ax.plot([r["bytes"] / MiB for r in rows], [r["seconds"] for r in rows], marker="o",
                    label=f"{backend}, {n} gen")
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("seconds per sync")
    ax.set_title("Weight sync")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "weight_sync.png"))

    if res.get("sweep"):
        sw = res["sweep"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([str(r["value"]) for r in sw["rows"]], [r["samples_per_s"] for r in sw["rows"]], marker="o")
        ax.set_xlabel(sw["key"])
        ax.set_ylabel("samples / s")
        ax.set_title(f"Throughput against {sw['key']}")
        files.append(_save(fig, out / "sweep.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([m["actor"] for m in res["memory"]], [m["peak_rss_bytes"] / MiB for m in res["memory"]])
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title("Peak resident memory per actor")
    ax.tick_params(axis="x", rotation=30)
    files.append(_save(fig, out / "memory.png"))
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def rerender(out: Path) -> None:
    """Recompute comparisons, targets, ``results.md`` and plots from a saved ``results.json``."""
    import json

    from ray_rlhf.bench.generation import compare

    res = json.loads((out / "results.json").read_text())
    gen = res["generation"]
    res["generation"] = compare(res["endtoend"], res["bound"],
                                {"per_step": gen["hf_per_step"], "tokens_per_s": gen["hf_generate_tokens_per_s"]})
    res["targets"] = targets(res)
    res["plots"] = plots(res, out)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))


if __name__ == "__main__":  # python -m ray_rlhf.bench.report DIR: re-render a finished run
    import sys

    rerender(Path(sys.argv[1]))
