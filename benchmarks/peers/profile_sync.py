"""Where a weight sync's time goes, part by part, on the peer benchmark's policy.

    .venv/bin/python benchmarks/peers/profile_sync.py              # 6 syncs per setting
    .venv/bin/python benchmarks/peers/profile_sync.py --syncs 10 --parts 1,4,8

Real Ray (a local cluster of the machine's cores) and real vLLM: a learner stand-in actor holding
the peer benchmark's ``small`` ~26 M Llama policy behind a
:class:`~ray_rlhf.sync.sender.WeightSender` (its weights move a little before every sync), one
:class:`~ray_rlhf.generation.generator.Generator` actor, and the run's
:class:`~ray_rlhf.sync.broadcaster.WeightBroadcaster` over the object store -- what
``ray-rlhf train`` builds. For each ``sync.verify_parts`` setting it times, per sync:

- **export**: the learner's :meth:`~ray_rlhf.sync.sender.WeightSender.export` into the object store;
- **load**: the generator resolving it and :meth:`~ray_rlhf.sync.receiver.WeightReceiver.load`
  (fingerprints of what arrived + the engine's ``reload_weights``);
- **verify**: the broadcaster's verify step (engine read-back + learner checksum + comparison);
- **publish**: one whole :meth:`~ray_rlhf.sync.broadcaster.WeightBroadcaster.publish` as the
  driver calls it (liveness ping, export, load, verify).

Medians over the syncs after the first of each setting. Nothing is asserted; it prints a markdown
table and writes ``results/profile_sync.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class _Source:
    """The learner's side of a sync, and nothing else: the policy and its WeightSender."""

    def __init__(self, path: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        from ray_rlhf.sync.sender import WeightSender

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.weights = WeightSender(self.model.state_dict)

    def nudge(self) -> None:
        """What an update does to the weights, as far as a sync can tell: every one of them moves."""
        import torch

        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1e-4)

    def ping(self) -> int:
        return 1


def profile(policy: str, parts_list: list[int], syncs: int) -> dict:
    import os

    import ray

    from ray_rlhf.generation.generator import Generator
    from ray_rlhf.sync.broadcaster import WeightBroadcaster
    from ray_rlhf.sync.receiver import WeightReceiver
    from ray_rlhf.sync.remote import call
    from ray_rlhf.sync.sender import WeightSender
    from ray_rlhf.sync.types import SyncResult

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        src = ray.remote(num_cpus=1)(_Source).remote(policy, cores)
        gen = ray.remote(num_cpus=0.5)(Generator).remote(policy, "g0", max_model_len=128)
        ray.get([src.ping.remote(), gen.ping.remote()])
        members, out, version = {"g0": gen}, {}, 0
        for parts in parts_list:
            b = WeightBroadcaster(src, "object_store", verify=True, verify_parts=parts)
            rows = []
            for _ in range(syncs):
                ray.get(src.nudge.remote())
                version += 1
                t0 = time.perf_counter()
                ref = call(src, WeightSender.export)
                ray.wait([ref], fetch_local=False)
                t1 = time.perf_counter()
                ray.get(call(gen, WeightReceiver.load, version, ref, True))
                t2 = time.perf_counter()
                b._verified(SyncResult(version, "object_store", 0, t2 - t0, 1), members)
                t3 = time.perf_counter()
                ray.get(src.nudge.remote())
                version += 1
                t4 = time.perf_counter()
                b.publish(version, members)
                rows.append({"export": t1 - t0, "load": t2 - t1, "verify": t3 - t2, "publish": time.perf_counter() - t4})
            kept = rows[1:] or rows
            out[parts] = {k: statistics.median(r[k] for r in kept) for k in kept[0]}
        return out
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from run import cpu_name, prepare  # the peer benchmark's models

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="1,4", help="sync.verify_parts settings, comma-separated")
    ap.add_argument("--syncs", type=int, default=6)
    ap.add_argument("--work", type=Path, default=HERE.parents[1] / "runs" / "peers", help="as run.py's --work")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    inputs = prepare(args.work, args.work / "models")
    res = profile(inputs["policy"], [int(p) for p in args.parts.split(",")], args.syncs)
    print(f"\n{cpu_name()} ({platform.machine()}), one generator, medians over syncs 2..{args.syncs}\n")
    print("| sync.verify_parts | export s | load s | verify s | publish s |\n|---|---|---|---|---|")
    for parts, r in res.items():
        print(f"| {parts} | {r['export']:.3f} | {r['load']:.3f} | {r['verify']:.3f} | {r['publish']:.3f} |")
    (HERE / "results" / "profile_sync.json").write_text(json.dumps({"cpu": cpu_name(), "syncs": args.syncs,
                                                                   "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
