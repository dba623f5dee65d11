"""The learner ranks of a run, as the driver sees them: one owner, a few verbs.

:class:`LearnerGroup` starts ``learner.num`` :class:`~ray_rlhf.learning.learner.Learner` actors in
one placement group, joins them in a torch.distributed process group (gloo on CPU, NCCL on GPU;
DDP or FSDP2, see :mod:`ray_rlhf.learning.parallel`) and is the only code that talks to them:
:meth:`~LearnerGroup.step` (one update on a scored batch, passed by ObjectRef to every rank),
:meth:`~LearnerGroup.save` / :meth:`~LearnerGroup.load` (the learner's part of a checkpoint), and
:attr:`~LearnerGroup.source`, rank 0, whose weights the broadcaster sends.

A rank that dies fails the call at once with a :class:`LearnerError` naming it (the survivors,
left waiting in a collective, are killed rather than waited for).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.learning.lora import LoraSpec
from ray_rlhf.learning.stats import LearnerStats
from ray_rlhf.models.packing_probe import resolve_packing


class LearnerError(RuntimeError):
    """A learner rank died (its node was lost, it ran out of memory, it was killed)."""


def learner_options(cfg: RunConfig, rank: int = 0, packing: bool = False) -> LearnerOptions:
    """A rank's :class:`LearnerOptions`, resolved from the run config; ``packing``: ``ppo.packing``
    resolved once for every rank (:func:`learner_kwargs`)."""
    lc = cfg.learner
    return LearnerOptions(algo=cfg.algo, response_budget=cfg.rollout.max_new_tokens,
                          max_staleness=cfg.rollout.max_staleness,
                          old_logprobs_from_sampler=cfg.old_logprobs_from_sampler, kl_in_loss=cfg.kl_in_loss,
                          rank=rank, world_size=lc.num, strategy=lc.strategy, dtype=lc.dtype,
                          gradient_checkpointing=lc.gradient_checkpointing, compile=lc.compile,
                          shard_reference=lc.shard_reference, overlong=cfg.rollout.overlong,
                          overlong_buffer=cfg.rollout.overlong_buffer,
                          collective_timeout_s=lc.collective_timeout_s,
                          reserved_cpus=lc.num_cpus, packing=packing, lora=lora_spec(cfg))


def lora_spec(cfg: RunConfig) -> LoraSpec:
    """``lora.*`` for the learner (rank 0: off); ``lora.sync`` resolved (``merged``: the learner
    exports merged full weights; ``adapter``: the adapters alone)."""
    lo = cfg.lora
    targets = tuple(lo.target_modules) if lo.target_modules is not None else None
    return LoraSpec(rank=lo.rank, alpha=lo.alpha, target_modules=targets, dropout=lo.dropout, sync=lo.resolved_sync)


def learner_kwargs(cfg: RunConfig, policy_path: str | Path, rank: int = 0) -> dict[str, Any]:
    """The :class:`Learner` constructor arguments of rank ``rank`` of a run (the benchmarks use them too)."""
    lc = cfg.learner
    cores = None
    if lc.pin_cores:
        available = sorted(os.sched_getaffinity(0))
        per = lc.torch_threads or 1
        cores = [available[(rank * per + k) % len(available)] for k in range(per)]
    return dict(model_path=str(policy_path), ppo=cfg.ppo, kl=cfg.kl, seed=cfg.seed, device=lc.device,
                temperature=cfg.rollout.temperature, critic_path=cfg.model.critic_path,
                torch_threads=lc.torch_threads, cores=cores,
                options=learner_options(cfg, rank, resolve_packing(cfg.ppo.packing, policy_path)))


class LearnerGroup:
    """The learner actor(s) of one run."""

    def __init__(self, cfg: RunConfig, policy_path: str | Path, shared_pg: Any = None):
        """``shared_pg``: a placement group of ``learner.num`` bundles that rank ``i`` joins at bundle
        ``i`` (``placement=colocated``: generator ``i`` is there too); the group does not remove it."""
        lc = cfg.learner
        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
        actor = ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, max_restarts=0)(Learner)
        self.pg, self.owns_pg = shared_pg, shared_pg is None
        if shared_pg is not None:
            self.ranks = [
                actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(shared_pg, placement_group_bundle_index=i))
                .remote(**learner_kwargs(cfg, policy_path, rank=i))
                for i in range(lc.num)
            ]
            return
        if lc.num == 1:  # one rank: an ordinary actor, placed like the others
            self.ranks = [actor.remote(**learner_kwargs(cfg, policy_path))]
            return
        # several ranks start together or not at all (one placement group, packed onto few nodes)
        self.pg = placement_group([dict(bundle) for _ in range(lc.num)], strategy="PACK")
        self.ranks = [
            actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i))
            .remote(**learner_kwargs(cfg, policy_path, rank=i))
            for i in range(lc.num)
        ]

    @property
    def source(self) -> Any:
        """The rank that exports weights to the generators (a ``WeightSource``)."""
        return self.ranks[0]

    def ready(self) -> None:
        """Wait until every rank is built and, with several, joined in their process group."""
        self._all([r.ping.remote() for r in self.ranks])
        if len(self.ranks) > 1:
            host, port = ray.get(self.ranks[0].group_address.remote())
            self._all([r.join_group.remote(host, port) for r in self.ranks])

    def step(self, batch: Any) -> LearnerStats:
        """One update on a scored :class:`~ray_rlhf.records.RolloutBatch` (or its ObjectRef);
        every rank returns the same whole-batch statistics."""
        return self._all([r.step.remote(batch) for r in self.ranks])[0]

    def placements(self) -> list[dict]:
        """Where each rank runs (:meth:`Learner.placement`), rank order; rank ``i`` is scheduled at
        bundle ``i`` of the group's placement group."""
        return self._all([r.placement.remote() for r in self.ranks])

    def offload(self) -> int:
        """``placement=colocated``: every rank's AdamW state to CPU, gradients freed (the engines on
        their GPUs generate next); returns the bytes moved per rank (rank 0's)."""
        return self._all([r.offload.remote() for r in self.ranks])[0]

    def reload(self) -> int:
        """``placement=colocated``: every rank's AdamW state back on its device, before the update."""
        return self._all([r.reload.remote() for r in self.ranks])[0]

    def save(self, directory: str | Path) -> None:
        """Every rank's part of a checkpoint into a local ``directory`` (rank 0 writes)."""
        self._all([r.save_state.remote(str(directory)) for r in self.ranks])

    def load(self, directory: str | Path) -> None:
        self._all([r.load_state.remote(str(directory)) for r in self.ranks])

    def save_part(self, uri: str, staging: Any) -> dict[str, int]:
        """The learner's part of a checkpoint, written by rank 0 into the store at ``uri`` from
        its own node (:class:`~ray_rlhf.checkpoint.Staging`); returns the files and their sizes."""
        return self._all([r.save_part.remote(uri, staging) for r in self.ranks])[0]

    def load_part(self, uri: str, ckpt: Any) -> None:
        """Every rank loads a checkpoint of the store at ``uri`` (fetched to its own node)."""
        self._all([r.load_part.remote(uri, ckpt) for r in self.ranks])

    def _all(self, refs: list) -> list:
        """Every rank's result; a dead rank fails the call at once, naming it."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except RayActorError as e:
                rank = refs.index(done[0])
                self.shutdown()
                raise LearnerError(f"learner rank {rank} of {len(self.ranks)} died "
                                   f"({type(e).__name__}); the step failed") from e
        return ray.get(refs)

    def shutdown(self) -> None:
        for r in self.ranks:
            try:
                ray.kill(r)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.pg is not None and self.owns_pg:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - already removed
                pass
