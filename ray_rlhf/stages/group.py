"""A stage on several learner ranks: ``ray-rlhf sft|rm|dpo learner.num=N`` (N > 1).

:func:`run_stage_group` starts ``N`` :class:`StageRank` actors in one placement group (on the Ray of
``RAY_ADDRESS`` -- as under ``ray job submit`` -- or a local one), gives them rank 0's address for
their process group, and has each run :func:`~ray_rlhf.stages.runner.run_stage` as its rank. The
command's process only watches: it reports rank 0's metrics rows as they come (console line,
``metrics.jsonl``) and passes a SIGTERM on as a stop request, which the ranks agree on at the end
of a step (checkpoint written, the same command resumes). A rank that dies fails the command with
one line naming it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ray_rlhf.stages.runner import StageOptions, run_stage

POLL_S = 0.5
"""How often the command asks rank 0 for new metrics rows."""


class StageRank:
    """One rank of a stage (a plain class; :func:`run_stage_group` makes it a Ray actor that
    takes two calls at once: ``run`` and the command's polls)."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.rows: list[dict] = []
        self.stop = threading.Event()

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a free port for the group's TCP store."""
        from ray_rlhf.learning.dist import free_address

        return free_address()

    def run(self, opts: StageOptions, rank: int, address: tuple[str, int]) -> int:
        """The whole stage as rank ``rank``; returns the steps taken."""
        return len(run_stage(opts, report=self.rows.append, should_stop=self.stop.is_set, rank=rank, address=address))

    def rows_since(self, start: int) -> list[dict]:
        return self.rows[start:]

    def request_stop(self) -> None:
        self.stop.set()


def connect() -> None:
    """Ray: already connected, the cluster of ``RAY_ADDRESS``, or a local one."""
    import ray

    from ray_rlhf.run.cluster import check_reachable, local_runtime_env

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, runtime_env=local_runtime_env(), logging_level=logging.WARNING)


def run_stage_group(opts: StageOptions, report: Callable[[dict], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> int:
    """Run the stage on ``opts.num_ranks`` rank actors; rank 0's rows go to ``report`` as they come.
    Returns the steps taken (fewer than ``opts.steps`` after a stop)."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from ray_rlhf.errors import UserError

    connect()
    n, cpus, gpus = opts.num_ranks, opts.num_cpus, int(opts.device == "cuda")
    have = ray.cluster_resources().get("GPU", 0)
    if gpus and have < n:
        raise UserError(f"learner.device=cuda with learner.num={n} needs {n} GPUs (one per rank); the Ray cluster has "
                        f"{have:g}; lower learner.num or set learner.device=cpu")
    pg = placement_group([{"CPU": cpus, **({"GPU": 1} if gpus else {})} for _ in range(n)], strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise UserError(f"learner.num={n} ranks of learner.num_cpus={cpus} CPUs do not fit in the Ray cluster "
                        f"({ray.cluster_resources().get('CPU', 0):g} CPUs); lower learner.num or learner.num_cpus") from None
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_concurrency=2)(StageRank)
    ranks = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
             .remote(max(1, int(cpus))) for i in range(n)]
    try:
        address = ray.get(ranks[0].address.remote())
        pids = ray.get([r.pid.remote() for r in ranks])
        backend = "nccl" if gpus else "gloo"
        print(f"{opts.stage}: {n} learner ranks ({opts.strategy.upper()}, {backend}), pids {' '.join(map(str, pids))}",
              flush=True)
        runs = [r.run.remote(opts, i, address) for i, r in enumerate(ranks)]
        seen, stop_sent = 0, False
        pending = list(runs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for i, ref in enumerate(runs):
                if ref not in pending:
                    try:
                        ray.get(ref)
                    except RayActorError as e:
                        raise RuntimeError(f"stage rank {i} of {n} died ({type(e).__name__}); the stage failed") from e
            try:
                rows = ray.get(ranks[0].rows_since.remote(seen))
            except RayActorError:
                rows = []
            for row in rows:
                if report is not None:
                    report(row)
            seen += len(rows)
            if should_stop is not None and should_stop() and not stop_sent:
                ranks[0].request_stop.remote()
                stop_sent = True
        return int(ray.get(runs[0]))
    finally:
        for r in ranks:
            ray.kill(r)
        remove_placement_group(pg)
