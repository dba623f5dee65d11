"""Start the actors of a run and hold them: learner, reward, generator pool, weight broadcast.

The classes run as actors are the plain classes (:class:`~ray_rlhf.learner.Learner`,
:class:`~ray_rlhf.rewards.scorer.RewardScorer`, :class:`~ray_rlhf.generator.Generator`);
``ray.remote`` is applied here, at launch, with the resources from the config.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import ray

from ray_rlhf import checkpoint
from ray_rlhf.config.schema import RunConfig
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.errors import UserError
from ray_rlhf.generator import Generator
from ray_rlhf.learner import Learner
from ray_rlhf.pool import ACTOR_DEAD_ERRORS, GeneratorPool, request_capacity
from ray_rlhf.rewards.scorer import RewardScorer
from ray_rlhf.sync import base as sync
from ray_rlhf.sync.collective import CollectiveSourceMixin, close_group, open_group

log = logging.getLogger(__name__)


class LearnerActor(Learner, CollectiveSourceMixin):
    """The learner as run in its actor: the plain Learner plus the collective-broadcast endpoint."""


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when ``RAY_ADDRESS`` points nowhere."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://")[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it (`ray start --head`) "
            "or unset RAY_ADDRESS / ray.address to run on a local Ray"
        ) from None


def init_ray(cfg: RunConfig) -> None:
    """Join ``ray.address`` / ``RAY_ADDRESS`` when set (as under ``ray job submit``), else start Ray."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Let actors import the user's reward modules from the directory the run was started in.
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
                        "TOKENIZERS_PARALLELISM": "false",
                        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}
    if address:
        _check_reachable(address)
        # Joining a cluster (e.g. under `ray job submit`): the job's runtime env (--working-dir,
        # --runtime-env) already says where code comes from; do not override it.
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=env)


class RLHFSystem:
    """The live actors of one run and the operations the driver performs on them."""

    def __init__(self, cfg: RunConfig, policy_path: Path, prompts: list[str]):
        self.cfg = cfg
        self.stream = PromptStream(prompts, seed=cfg.seed)
        self.version = 0
        self._group_membership = -1
        lc = cfg.learner
        self.learner = ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus)(LearnerActor).remote(
            model_path=str(policy_path), ppo=cfg.ppo, kl=cfg.kl, seed=cfg.seed, device=lc.device,
            temperature=cfg.rollout.temperature, critic_path=cfg.model.critic_path, torch_threads=lc.torch_threads,
        )
        rc = cfg.reward
        # Stateless scoring: Ray restarts a dead reward actor and retries the call.
        self.reward = ray.remote(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_restarts=3, max_task_retries=3)(
            RewardScorer
        ).remote([(f.name, f.weight) for f in rc.functions], rc.model_path, rc.model_weight, rc.batch_size)
        ray.get([self.learner.ping.remote(), self.reward.ping.remote()])  # surface construction errors now

        g = cfg.generators
        bundle = {"CPU": g.num_cpus, **({"GPU": g.num_gpus} if g.num_gpus else {})}
        self.capacity_requested = request_capacity(bundle, cfg.pool_max)
        gen_cls = ray.remote(num_cpus=g.num_cpus, num_gpus=g.num_gpus, max_restarts=0)(Generator)
        self.pool = GeneratorPool(
            gen_cls, lambda gid: self._generator_kwargs(policy_path, gid), bundle,
            size=g.num, min_size=cfg.pool_min, max_size=cfg.pool_max, on_join=self._sync_joining,
            max_restarts=g.max_restarts,
        )

    def _generator_kwargs(self, policy_path: Path, gid: str) -> dict[str, Any]:
        g = self.cfg.generators
        return dict(
            model_path=str(policy_path), generator_id=gid, max_model_len=g.max_model_len,
            max_prompt_tokens=self.cfg.data.max_prompt_tokens, seed=self.cfg.seed,
            gpu_memory_utilization=g.gpu_memory_utilization if g.num_gpus else None,
            tensor_parallel_size=g.tensor_parallel_size, kv_cache_gib=g.kv_cache_gib,
        )

    # ---- weights ------------------------------------------------------------------------------
    def _sync_joining(self, handles: list) -> None:
        """A joining generator holds the initial weights: bring it to the current version first."""
        if self.version == 0:
            if self.cfg.sync.verify:
                sync.verify(sync.wait([sync.call(self.learner, "weights_checksum")])[0], handles, 0)
            return
        sync.broadcast("object_store", self.learner, handles, self.version, self.cfg.sync.verify)

    def broadcast(self, version: int) -> sync.SyncResult:
        """Publish the learner's new weights as ``version`` to every generator (one call per sync).

        Generators that died since the rollout (e.g. while the learner trained) are dropped first,
        so a collective group is rebuilt without them. One that dies during the sync is dropped and
        the survivors are synced again. Replacements for the dead then start and join at ``version``
        (:meth:`_sync_joining`); :class:`~ray_rlhf.pool.PoolError` if the pool falls below its minimum.
        """
        dead = self.pool.check_alive()
        try:
            result = self._send(version)
        except (*ACTOR_DEAD_ERRORS, ray.exceptions.RayTaskError) as e:
            # A collective peer's death surfaces on the learner as a task error; survivors left
            # blocked in the collective do not answer and are replaced too.
            lost = self.pool.check_alive(timeout_s=30)
            if not lost:
                raise
            log.warning("generator(s) %s died during the weight sync (%s); syncing the others again", lost,
                        type(e).__name__)
            dead += lost
            result = self._send(version)
        self.version = version
        if dead:
            self.pool.replace(len(dead))
        return result

    def _send(self, version: int) -> sync.SyncResult:
        backend = self.cfg.sync.backend
        if backend == "collective" and self._group_membership != self.pool.membership_version:
            if self._group_membership >= 0:
                close_group(self.learner, self.pool.handles)
            open_group(self.learner, self.pool.handles, backend="nccl" if self.cfg.learner.device == "cuda" else "gloo")
            self._group_membership = self.pool.membership_version
        return sync.broadcast(backend, self.learner, self.pool.handles, version, self.cfg.sync.verify)

    # ---- faults, elasticity, checkpoints ---------------------------------------------------------------
    def faults_at(self, step: int) -> list[int]:
        return [k.index for k in self.cfg.faults.kill_generator if k.step == step]

    def kill_reward(self) -> None:
        """Fault injection (``faults.kill_reward_at_step``): kill the reward actor and let Ray restart
        it (``max_restarts=3``); the next scoring call is retried on the new instance."""
        log.warning("fault injection: killing the reward actor (Ray restarts it)")
        ray.kill(self.reward, no_restart=False)

    def maybe_grow(self) -> None:
        if len(self.pool) < self.cfg.pool_max:
            added = self.pool.grow(timeout_s=1.0)
            if added:
                log.info("generator pool grew by %s to %d", added, len(self.pool))

    def save_checkpoint(self, out: Path, step: int) -> Path:
        state = {"step": step, "version": self.version, "data": self.stream.state_dict(),
                 "pool_restarts": self.pool.restarts, "config": self.cfg.model_dump(mode="json")}
        path = checkpoint.save(out, step, lambda tmp: ray.get(self.learner.save_state.remote(str(tmp))), state,
                               keep=self.cfg.checkpoint.keep)
        log.info("checkpoint written: %s", path)
        return path

    def resume(self, path: Path, state: dict) -> int:
        """Load a checkpoint into the learner and bring every generator to its version."""
        ray.get(self.learner.load_state.remote(str(path)))
        self.stream.load_state_dict(state["data"])
        self.pool.restarts = int(state.get("pool_restarts", 0))
        self.version = int(state["version"])
        sync.broadcast("object_store", self.learner, self.pool.handles, self.version, self.cfg.sync.verify)
        log.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])

    def shutdown(self) -> None:
        self.pool.shutdown()
        for actor in (self.learner, self.reward):
            try:
                ray.kill(actor)
            except Exception:
                pass
