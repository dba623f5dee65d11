"""Where the learner's time goes, pass by pass, on the peer benchmark's batch.

    .venv/bin/python benchmarks/peers/profile_learner.py                # 64 new tokens, 3 timed steps
    .venv/bin/python benchmarks/peers/profile_learner.py --tokens 256 --reps 2

One process, ray-rlhf's environment, the learner's own thread count (``default_threads``: the
node's cores in a synchronous run), the peer benchmark's models and settings (the ``small`` ~26 M
Llama policy, 64 rows of the benchmark's prompts + exactly ``--tokens`` response tokens, 1 epoch of
2 minibatches of 32, fp32, AdamW). It times, on the same batch:

- the **passes** both learners are made of, in plain PyTorch + transformers with nothing around
  them: a policy forward without gradients (log-probs of the response tokens), a policy forward +
  backward + AdamW step (the update's floor), the small critic's forward and forward + backward;
- **ray-rlhf's** :class:`~ray_rlhf.learning.learner.Learner` (built with ``learner_kwargs`` from the
  same config the peer benchmark runs): its ``prepare`` and ``update``, with the value head on the
  policy's trunk (the default) and with a separate small critic and pi_old from the sampler (TRL's
  shape, ``model.critic_path`` + ``ppo.old_logprobs=sampler``).

From the passes it prints each learner's floor -- TRL's PPO: reference forward + critic forward
+ policy and critic forward/backward/step; ray-rlhf's default: reference forward + policy (with
value head) forward + its forward/backward/step -- beside the measured ``Learner``, so that the
overhead of our code (measured / floor) and the cost of the design (the floors' ratio) read
apart. Medians of ``--reps`` timed repetitions after one warm-up. Nothing is asserted.

``--ops`` also runs one more step of the default ``Learner`` under ``torch.profiler`` and prints
where its CPU time goes, by operator (self time) and by kind -- matrix products, attention,
elementwise and normalisation kernels, the rest -- so that a learner below its matmul peak says
why.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def peer_config(inputs: dict, tokens: int, cache: Path, extra: list[str]):
    from run import ray_rlhf_overrides  # the peer benchmark's own settings

    from ray_rlhf.config import load_config

    ov = ray_rlhf_overrides(inputs, "ppo", tokens, 2, 1e-4, cache / "unused", cache)
    return load_config("small", ov + extra)


def peer_batch(inputs: dict, tokens: int, vocab: int, version: int = 0, seed: int = 0):
    """64 rows: the benchmark's prompts, ``tokens`` random response tokens each, random rewards."""
    from ray_rlhf.records import RolloutBatch

    rng = np.random.default_rng(seed)
    prompts = json.loads(Path(inputs["prompts"]).read_text())
    n = 64
    pids = [prompts[i % len(prompts)] for i in range(n)]
    return RolloutBatch.from_sequences(
        prompt_index=list(range(n)), sample_index=[0] * n, prompt_ids=pids,
        response_ids=[rng.integers(3, vocab, size=tokens).tolist() for _ in range(n)],
        sampler_logprobs=[(-rng.random(tokens) * 3).tolist() for _ in range(n)], prompt=["p"] * n,
        response=["r"] * n, finish_reason=["length"] * n, policy_version=[version] * n, generator_id=["g"] * n,
        columns={}, reward=rng.normal(size=n).tolist())


def passes(inputs: dict, batch, reps: int) -> dict[str, float]:
    """The plain passes, 2 minibatches of 32 rows each, on padded (input_ids, mask) of ``batch``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ray_rlhf.learning.batch import collate

    tb = collate(batch, 0)
    ids = torch.cat([tb.prompt_ids, tb.response_ids], 1)
    mask = torch.cat([tb.prompt_mask, tb.response_mask.long()], 1)
    halves = [slice(0, 32), slice(32, 64)]
    policy = AutoModelForCausalLM.from_pretrained(inputs["policy"], dtype=torch.float32)
    critic = AutoModelForSequenceClassification.from_pretrained(inputs["small_critic"], dtype=torch.float32)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=1e-7)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-7)

    def logp(model, s):
        logits = model(input_ids=ids[s], attention_mask=mask[s]).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[s][:, 1:, None]).squeeze(-1)

    def fwd():
        with torch.no_grad():
            for s in halves:
                logp(policy, s)

    def fwd_bwd_step():
        for s in halves:
            opt_p.zero_grad(set_to_none=True)
            (logp(policy, s) * mask[s][:, 1:]).sum().backward()
            opt_p.step()

    def critic_fwd():
        with torch.no_grad():
            for s in halves:
                critic(input_ids=ids[s], attention_mask=mask[s])

    def critic_fwd_bwd_step():
        for s in halves:
            opt_c.zero_grad(set_to_none=True)
            critic(input_ids=ids[s], attention_mask=mask[s]).logits.sum().backward()
            opt_c.step()

    return {"policy_forward": median_time(fwd, reps), "policy_fwd_bwd_step": median_time(fwd_bwd_step, reps),
            "critic_forward": median_time(critic_fwd, reps),
            "critic_fwd_bwd_step": median_time(critic_fwd_bwd_step, reps)}


KINDS = (("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
         ("attention", ("scaled_dot_product", "flash_attention")),
         ("optimizer", ("_foreach", "adam")))
"""Operator name fragments by kind; what matches none is "elementwise, normalisation, other"."""


def kind_of(op: str) -> str:
    low = op.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return "elementwise, normalisation, other"


def op_profile(cfg, policy: str, tokens: int, inputs: dict, top: int = 15) -> dict:
    """One ``Learner.step`` (after a warm-up step) under ``torch.profiler``: self CPU seconds by
    operator (the ``top`` largest) and by kind. Times include the profiler's own overhead."""
    from torch.profiler import ProfilerActivity, profile

    learner, vocab = one_rank_learner(cfg, policy)
    learner.step(peer_batch(inputs, tokens, vocab, version=learner.version, seed=0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        learner.step(peer_batch(inputs, tokens, vocab, version=learner.version, seed=1))
    leave_group()
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(ops.values())
    kinds: dict[str, float] = {}
    for op, sec in ops.items():
        kinds[kind_of(op)] = kinds.get(kind_of(op), 0.0) + sec
    return {"total_s": total, "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top])}


def one_rank_learner(cfg, policy: str):
    """ray-rlhf's ``Learner`` built from ``cfg``, in a process group of one; and its vocabulary size."""
    from ray_rlhf.learning.group import learner_kwargs
    from ray_rlhf.learning.learner import Learner

    learner = Learner(**learner_kwargs(cfg, policy))
    learner.join_group(*learner.group_address())
    return learner, (learner.model.config.vocab_size if hasattr(learner.model, "config") else 512)


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def learner_times(cfg, policy: str, tokens: int, reps: int, inputs: dict) -> dict[str, float]:
    learner, vocab = one_rank_learner(cfg, policy)
    prep, upd = [], []
    for i in range(reps + 1):
        st = learner.step(peer_batch(inputs, tokens, vocab, version=learner.version, seed=i))
        if i:
            prep.append(st.prepare_seconds)
            upd.append(st.update_seconds)
    leave_group()
    return {"prepare": statistics.median(prep), "update": statistics.median(upd), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    from run import cpu_name, prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE.parents[1] / "runs" / "peers", help="as run.py's --work")
    ap.add_argument("--ops", action="store_true", help="also profile one Learner step by operator (torch.profiler)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.cache_dir = args.work / "models"
    inputs = prepare(args.work, args.cache_dir)

    from ray_rlhf.learning.learner import LearnerOptions, default_threads

    torch.set_num_threads(default_threads(LearnerOptions()))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(inputs["policy"]).vocab_size
    batch = peer_batch(inputs, args.tokens, vocab)
    p = passes(inputs, batch, args.reps)
    ours = learner_times(peer_config(inputs, args.tokens, args.cache_dir, []), inputs["policy"], args.tokens,
                         args.reps, inputs)
    shaped = learner_times(peer_config(inputs, args.tokens, args.cache_dir,
                                       [f"model.critic_path={inputs['critic_lm']}", "ppo.old_logprobs=sampler"]),
                           inputs["policy"], args.tokens, args.reps, inputs)
    trl_floor = p["policy_forward"] + p["critic_forward"] + p["policy_fwd_bwd_step"] + p["critic_fwd_bwd_step"]
    our_floor = 2 * p["policy_forward"] + p["policy_fwd_bwd_step"]
    rows = [("policy forward, no grad (reference or pi_old)", p["policy_forward"]),
            ("policy forward + backward + AdamW", p["policy_fwd_bwd_step"]),
            ("small critic forward", p["critic_forward"]),
            ("small critic forward + backward + AdamW", p["critic_fwd_bwd_step"]),
            ("floor, TRL's PPO (ref fwd + critic fwd + both fwd/bwd/step)", trl_floor),
            ("floor, value head on the trunk (ref fwd + policy fwd + fwd/bwd/step)", our_floor),
            ("ray-rlhf Learner, value head: prepare", ours["prepare"]),
            ("ray-rlhf Learner, value head: update", ours["update"]),
            ("ray-rlhf Learner, value head: total", ours["prepare"] + ours["update"]),
            ("ray-rlhf Learner, small critic + sampler pi_old: prepare", shaped["prepare"]),
            ("ray-rlhf Learner, small critic + sampler pi_old: update", shaped["update"]),
            ("ray-rlhf Learner, small critic + sampler pi_old: total", shaped["prepare"] + shaped["update"])]
    print(f"\n{cpu_name()} ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(learner: {ours['threads']}), 64 rows x {args.tokens} new tokens, medians of {args.reps}\n")
    print("| pass | s |\n|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} |")
    print(f"\nvalue head: measured / floor = {(ours['prepare'] + ours['update']) / our_floor:.2f}; "
          f"small critic: measured / TRL's floor = {(shaped['prepare'] + shaped['update']) / trl_floor:.2f}; "
          f"floors: value head / TRL = {our_floor / trl_floor:.2f}")
    ops = None
    if args.ops:
        ops = op_profile(peer_config(inputs, args.tokens, args.cache_dir, []), inputs["policy"], args.tokens, inputs)
        print(f"\nOne Learner step (value head) under torch.profiler: {ops['total_s']:.2f} s of self CPU time\n")
        print("| kind | s | share |\n|---|---|---|")
        for kind, sec in ops["kinds"].items():
            print(f"| {kind} | {sec:.2f} | {sec / ops['total_s']:.1%} |")
        print("\n| operator | self s | share |\n|---|---|---|")
        for op, sec in ops["top_ops"].items():
            print(f"| `{op}` | {sec:.2f} | {sec / ops['total_s']:.1%} |")
    out = HERE / "results" / f"profile_learner_{args.tokens}.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "tokens": args.tokens, "passes": p, "value_head": ours,
                               "small_critic": shaped, "trl_floor": trl_floor, "value_head_floor": our_floor,
                               "ops": ops}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
