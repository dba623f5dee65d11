"""ray-rlhf against TRL on the same work: one command, alternating repetitions, a table per phase.

    .venv/bin/python benchmarks/peers/run.py                 # every configuration, 2 repetitions
    .venv/bin/python benchmarks/peers/run.py --config short --reps 1 --steps 3

Equal work: the same offline models (the ``small`` preset's ~26 M-parameter Llama policy, a
~1.4 M-parameter ``tiny`` reward model), the same prompts tokenized the same way, 64 rollouts per
step of exactly ``--response-length`` new tokens (TRL's PPO runs to the length without a stop
token; ray-rlhf gets ``rollout.ignore_eos=true``), 1 PPO epoch of 2 minibatches, fp32, KL 0.05,
the same learning rate. Configurations: ``short`` (PPO, 64 new tokens), ``long`` (PPO, 256 new
tokens: generation dominates, as in real RLHF), ``grpo`` (GRPO, 16 prompts x 4 samples, 64 new
tokens; TRL's ``GRPOTrainer`` against ``algo.estimator=grpo``). Variants:

- ``trl`` -- ``trl.experimental.ppo.PPOTrainer`` (trl 1.0.0) with its usual small critic (a
  ``tiny`` sequence classifier, ~1.4 M);
- ``trl-policy-critic`` -- the same with a policy-sized critic (a ``small`` sequence classifier);
- ``ray-rlhf`` -- ``python -m ray_rlhf.train --config small`` with the value head on the policy's
  trunk (the default; what a user runs), weight sync verified (the default);
- ``ray-rlhf-async`` -- the same with ``rollout.max_staleness=1`` (generation of the next batch
  overlaps the learner; off-policy by at most one version, corrected by the decoupled loss);
- ``ray-rlhf-small-critic`` (not in the default set) -- TRL's own shape: a separate ~1.8 M critic
  (``model.critic_path``), so the policy runs no forward before the update (pi_old from the
  sampler, ``ppo.old_logprobs=auto``).

TRL runs in its own virtualenv (``benchmarks/peers/.venv``, made from ``requirements-trl.txt`` on
the first run: torch and transformers pinned to ray-rlhf's versions so both sides run the same
kernels). Each repetition runs every variant once, in an order that alternates between
repetitions, so that drift of a shared machine falls on all of them. Reported: medians over the
steps after the first of each run, per repetition, of seconds per step, per phase (generate,
learner; ray-rlhf's reward and weight sync separately), and seconds per 1,000 generated tokens.
Nothing here is asserted: it writes ``results/peers.json`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRL_VENV = HERE / ".venv"
CONFIGS = {"short": ("ppo", 64), "long": ("ppo", 256), "grpo": ("grpo", 64)}
"""Configuration name -> (algorithm, new tokens per response). PPO: 64 prompts x 1 sample; GRPO: 16
prompts x 4 samples (64 rollouts either way)."""
VARIANTS = ("trl", "trl-policy-critic", "ray-rlhf", "ray-rlhf-async", "ray-rlhf-small-critic")
RAY_RLHF_VARIANTS = {"ray-rlhf": [], "ray-rlhf-async": ["rollout.max_staleness=1"],
                     "ray-rlhf-small-critic": ["model.critic_path={critic_lm}"]}
"""ray-rlhf variant -> its extra overrides (``{name}`` filled from the prepared inputs)."""
DEFAULT_VARIANTS = ("trl", "trl-policy-critic", "ray-rlhf", "ray-rlhf-async")


def cpu_name() -> str:
    """Model name and vector instructions (AVX-512, AMX...: the matmul speed follows them), cores."""
    from ray_rlhf.telemetry.cpu import describe_cpu

    return f"{describe_cpu()}, {os.cpu_count()} cores"


def ensure_trl_venv() -> Path:
    """TRL's virtualenv, created and installed once (pinned by ``requirements-trl.txt``)."""
    py = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / ".installed"
    req = HERE / "requirements-trl.txt"
    if stamp.exists() and stamp.read_text() == req.read_text():
        return py
    print(f"peers: installing TRL into {TRL_VENV} (first run only)", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(req)], check=True)
    stamp.write_text(req.read_text())
    return py


def prepare(work: Path, cache: Path) -> dict:
    """Build the offline models once and write the prompts' token ids, tokenized as ray-rlhf does."""
    from ray_rlhf.config import load_config
    from ray_rlhf.models.factory import ensure_model
    from ray_rlhf.run.inputs import load_prompt_items, load_tokenizer

    paths = {"policy": ensure_model("policy", "small", cache), "reward": ensure_model("reward", "tiny", cache),
             "small_critic": ensure_model("reward", "tiny", cache, seed=1),
             "policy_critic": ensure_model("reward", "small", cache, seed=1),
             "critic_lm": ensure_model("policy", "tiny", cache, seed=1)}
    cfg = load_config("small", [f"model.cache_dir={cache}"])
    items = load_prompt_items(cfg, load_tokenizer(Path(paths["policy"])))
    prompts, texts = work / "prompts.json", work / "prompt_texts.json"
    prompts.write_text(json.dumps([list(p.prompt_ids) for p in items]))
    texts.write_text(json.dumps([p.text for p in items]))
    return {**{k: str(v) for k, v in paths.items()}, "prompts": str(prompts), "prompt_texts": str(texts)}


def ray_rlhf_overrides(inputs: dict, algo: str, tokens: int, steps: int, lr: float, out: Path,
                       cache: Path) -> list[str]:
    shape = (["rollout.prompts_per_step=64", "rollout.samples_per_prompt=1"] if algo == "ppo" else
             ["rollout.prompts_per_step=16", "rollout.samples_per_prompt=4", "algo.estimator=grpo"])
    return [f"steps={steps}", f"output_dir={out}", f"model.cache_dir={cache}", *shape,
            f"rollout.max_new_tokens={tokens}", "rollout.ignore_eos=true",
            f"generators.max_model_len={48 + tokens}", "generators.num=1", "generators.shard_prompts=64",
            "ppo.epochs=1", "ppo.minibatch_size=32", "ppo.micro_batch_size=32", f"ppo.lr={lr}", "kl.beta=0.05",
            f"reward.model_path={inputs['reward']}", "reward.functions=[]", "checkpoint.every=0",
            "logging.progress_bar=false", "logging.tensorboard=false"]


def run_logged(cmd: list[str], log: Path, **kw) -> None:
    """Run ``cmd`` with its output in ``log``; on failure show the log's tail and stop."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"peers: {' '.join(cmd[:4])} ... failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))


def run_ray_rlhf(inputs: dict, variant: str, algo: str, tokens: int, steps: int, lr: float, work: Path,
                 cache: Path, tag: str) -> dict:
    out = work / tag
    cmd = [sys.executable, "-m", "ray_rlhf.train", "--config", "small",
           *ray_rlhf_overrides(inputs, algo, tokens, steps, lr, out, cache),
           *(o.format(**inputs) for o in RAY_RLHF_VARIANTS[variant])]
    run_logged(cmd, work / f"{tag}.log", cwd=ROOT)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"framework": "ray-rlhf", "steps": [
        {"step": int(m["step"]), "step_s": float(m["time/step"]), "generate_s": float(m["time/generate"]),
         "learner_s": float(m["time/learn"]), "reward_s": float(m["time/reward"]), "sync_s": float(m["time/sync"]),
         "prepare_s": float(m["ppo/prepare_seconds"]), "update_s": float(m["ppo/update_seconds"]),
         "generated_tokens": float(m["perf/generated_tokens_per_s"]) * float(m["time/generate"])} for m in rows]}


def run_trl(py: Path, inputs: dict, variant: str, algo: str, tokens: int, steps: int, lr: float, work: Path,
            tag: str) -> dict:
    out = work / f"{tag}.json"
    common = ["--policy", inputs["policy"], "--reward", inputs["reward"], "--steps", str(steps),
              "--response-length", str(tokens), "--lr", str(lr), "--out", str(out)]
    if algo == "grpo":
        cmd = [str(py), str(HERE / "trl_grpo.py"), *common, "--prompts", inputs["prompt_texts"]]
    else:
        critic = inputs["small_critic" if variant == "trl" else "policy_critic"]
        cmd = [str(py), str(HERE / "trl_ppo.py"), *common, "--critic", critic, "--prompts", inputs["prompts"]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_logged(cmd, work / f"{tag}.log", env=env)
    return json.loads(out.read_text())


def applies(config: str, variant: str) -> bool:
    """GRPO has no critic: no critic variants there."""
    return not (CONFIGS[config][0] == "grpo" and variant in ("trl-policy-critic", "ray-rlhf-small-critic"))


def summarize(run: dict) -> dict:
    """Medians over the steps after the first (warm-up) of one run."""
    kept = run["steps"][1:] or run["steps"]
    med = {k: statistics.median(r[k] for r in kept) for k in kept[0] if k.endswith("_s")}
    med["s_per_1k_tokens"] = statistics.median(r["step_s"] / r["generated_tokens"] * 1000 for r in kept)
    med["generated_tokens"] = statistics.median(r["generated_tokens"] for r in kept)
    return med


def table(results: dict, cpu: str) -> str:
    lines = [f"CPU: {cpu}", ""]
    for config, by_variant in results.items():
        algo, tokens = CONFIGS[config]
        lines += [f"**{config}** ({algo.upper()}, {tokens} new tokens per response, 64 rollouts per step); "
                  "one value per repetition, medians over steps 2+",
                  "", "| variant | s/step | generate s | learner s | reward + sync s | s / 1k generated tokens | "
                  "speed vs trl |", "|---|---|---|---|---|---|---|"]
        base = statistics.median(s["step_s"] for s in by_variant["trl"])

        def cell(key: str, runs: list[dict], fmt: str = "{:.2f}") -> str:
            return " / ".join(fmt.format(r[key]) if key in r else "-" for r in runs)

        for variant, runs in by_variant.items():
            other = [{"x": r.get("reward_s", 0) + r.get("sync_s", 0)} if "sync_s" in r else {} for r in runs]
            speed = base / statistics.median(r["step_s"] for r in runs)
            lines.append(f"| {variant} | {cell('step_s', runs)} | {cell('generate_s', runs)} | "
                         f"{cell('learner_s', runs)} | {cell('x', other)} | {cell('s_per_1k_tokens', runs, '{:.3f}')} | "
                         f"{speed:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="short,long,grpo", help="comma-separated: short, long, grpo")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="steps per run (default 6 short, 4 long)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--work", default=str(ROOT / "runs" / "peers"))
    p.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    a = p.parse_args(argv)
    configs = [c for c in a.config.split(",") if c]
    variants = [v for v in a.variants.split(",") if v]
    unknown = [c for c in configs if c not in CONFIGS] + [v for v in variants if v not in VARIANTS]
    if unknown or "trl" not in variants:
        print(f"peers: unknown {unknown} (configs {', '.join(CONFIGS)}; variants {', '.join(VARIANTS)}, 'trl' "
              "needed as the baseline)", file=sys.stderr)
        return 2
    work, cache = Path(a.work), Path(a.work) / "models"
    work.mkdir(parents=True, exist_ok=True)
    py = ensure_trl_venv() if any(v.startswith("trl") for v in variants) else None
    inputs = prepare(work, cache)
    results: dict[str, dict[str, list[dict]]] = {c: {v: [] for v in variants if applies(c, v)} for c in configs}
    t0 = time.time()
    for rep in range(a.reps):
        for config in configs:
            algo, tokens = CONFIGS[config]
            steps = a.steps or (4 if config == "long" else 6)
            order = list(results[config]) if rep % 2 == 0 else list(results[config])[::-1]
            for v in order:
                tag = f"{config}-{v}-rep{rep}"
                print(f"peers: {tag} ({time.time() - t0:.0f} s)", flush=True)
                if v in RAY_RLHF_VARIANTS:
                    run = run_ray_rlhf(inputs, v, algo, tokens, steps, a.lr, work, cache, tag)
                else:
                    run = run_trl(py, inputs, v, algo, tokens, steps, a.lr, work, tag)
                results[config][v].append({**summarize(run), "raw": run})
    cpu = cpu_name()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"cpu": cpu, "results": results}, indent=1))
    print(table(results, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
