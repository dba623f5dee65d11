"""Config sections of running a job: weight sync, checkpoints, logging, fault injection, Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ray_rlhf.config.base import _Section


class SyncConfig(_Section):
    backend: Literal["object_store", "collective"] = "object_store"
    """Weight broadcast: one ``ray.put`` pulled by every generator, or a torch.distributed
    broadcast (gloo on CPU, NCCL on GPU)."""
    verify: bool = True
    """After each sync, check every generator: the tensors it received (checksum) and the weights
    its engine computes with (read back) must equal the learner's."""
    verify_parts: int = Field(4, ge=1)
    """Read the engine's CPU-packed linear layers back in full in this many rotating parts, one
    part per sync. Every sync still checks, exactly: every tensor the generator RECEIVED (checksum:
    any corruption or loss in transport fails that sync); every tensor the engine computes with
    that is not packed (norms, embeddings) in full; and one sampled input feature of every packed
    layer (a layer the engine did not reload, or loaded from another tensor, fails that sync). A
    packed layer whose load went wrong only outside its sampled feature fails the sync that reads
    its part: within ``verify_parts`` syncs. 1: every packed layer in full every sync (about one
    forward over ``hidden_size`` tokens per layer). GPU engines keep their weights unpacked and are
    read back in full every sync."""


class CheckpointConfig(_Section):
    location: str | None = None
    """Where checkpoints go (under ``<location>/checkpoints``): a directory, or a URI such as
    ``s3://bucket/prefix`` (``?endpoint_override=host:port&scheme=http`` for an S3-compatible
    server), ``gs://bucket/prefix`` or any pyarrow/fsspec filesystem. Empty: ``output_dir``. The
    learner writes its part there from its own node; a driver on another node resumes from it."""
    every: int = Field(0, ge=0)
    """Checkpoint every this many steps (0: only at the end)."""
    keep: int = Field(2, ge=1)
    """Newest complete checkpoints kept."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint of ``output_dir`` if any;
    ``never``: start fresh (refuses a dir that already has checkpoints); or a checkpoint path."""


class WandbConfig(_Section):
    project: str
    """W&B project."""
    name: str | None = None
    """W&B run name (empty: the run's ``name``)."""
    entity: str | None = None
    """W&B entity (team or user; empty: the default of the login)."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """``offline`` writes the run locally (``wandb sync`` uploads it later)."""


class LoggingConfig(_Section):
    tensorboard: bool = True
    """Write TensorBoard scalars to ``output_dir/tensorboard``."""
    progress_bar: bool = True
    """Show a progress bar on the console."""
    rollouts: bool = True
    """Write every completion with its reward to ``output_dir/rollouts`` (Parquet)."""
    quiet_actors: bool = True
    """Local runs: the actors' routine output (vLLM, torch, Ray) goes to ``output_dir/logs/``; only
    warnings of ray-rlhf and errors reach the console (``RAY_RLHF_VERBOSE=1`` shows everything)."""
    ray_metrics: bool = True
    """Export every step metric and the live gauges through Ray's metrics (Ray dashboard,
    Prometheus; names in docs/metrics.md)."""
    wandb: WandbConfig | None = None
    """Also log to Weights & Biases (``pip install 'ray-rlhf[wandb]'``). Empty: off."""


class FaultAt(_Section):
    step: int = Field(ge=1)
    """The step at which the fault happens."""


class KillGenerator(FaultAt):
    index: int = Field(0, ge=0)
    """Which generator (position in the pool)."""


class FaultsConfig(_Section):
    """Fault injection, for testing a deployment's recovery. Every key is a list of events, each
    naming its ``step`` (``faults.kill_learner=[{step: 3}]``)."""

    kill_generator: list[KillGenerator] = Field(default_factory=list)
    """Kill generator ``index`` during the rollout of ``step``."""
    hang_generator: list[KillGenerator] = Field(default_factory=list)
    """Generator ``index`` stops answering (alive, but stuck) just before the rollout of ``step``;
    its shard runs past the deadline and is re-queued."""
    kill_learner: list[FaultAt] = Field(default_factory=list)
    """Kill learner rank 0 during the update of ``step`` (the first event only); the run restores
    the newest checkpoint into a new learner group and goes on."""
    kill_reward: list[FaultAt] = Field(default_factory=list)
    """``ray.kill`` the reward actor (Ray restarts it) just before the scoring of ``step``."""
    stop: list[FaultAt] = Field(default_factory=list)
    """Exit (as if preempted) right after the checkpoint of ``step`` (the earliest event)."""


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster to join. Empty: ``RAY_ADDRESS`` if set, else start a local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray (empty: all)."""
    num_gpus: int | None = Field(None, ge=0)
    """GPUs of a local Ray (empty: the CUDA devices torch sees). More than the machine has declares
    LOGICAL GPUs: actors are placed as on a GPU node (bundles, ``CUDA_VISIBLE_DEVICES``) but
    compute where they can (``learner.device=cpu``, vLLM's CPU build) -- how the colocated
    placement is tested on CPU machines."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU (GiB) for the per-GPU budget of ``placement=colocated``. Empty: read from
    the local GPU when torch sees one; with neither (a CPU machine, or a driver on a CPU head node
    of a GPU cluster) the budget is not checked -- set it to have it checked."""
