"""Joining or starting Ray for a run."""

from __future__ import annotations

import logging
import os
import socket

import ray

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.console import LOG_DIR_ENV, quiet_ray_notices
from ray_rlhf.errors import UserError


def check_reachable(address: str) -> None:
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


def local_runtime_env(log_dir: str | None = None) -> dict:
    """The runtime env of a local Ray: actors import the user's reward modules from the directory
    the run was started in, and vLLM logs at WARNING unless the user asks for more. With
    ``log_dir``, every worker's output goes to a file there (:mod:`ray_rlhf.console`)."""
    env = {"env_vars": {
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        # libgomp's default busy-wait collapses an engine's or the learner's throughput (measured 4x)
        # as soon as another process runs on the core it spins on; passive waiting costs nothing.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }}
    if log_dir and not os.environ.get("RAY_RLHF_VERBOSE"):
        env["env_vars"][LOG_DIR_ENV] = log_dir
        env["worker_process_setup_hook"] = "ray_rlhf.console.setup_worker"
    return env


def init_ray(cfg: RunConfig, private: bool = False) -> None:
    """Join ``ray.address`` / ``RAY_ADDRESS`` when set (as under ``ray job submit``), else start Ray.

    ``private``: start a new local Ray even if one is running on this machine (benchmarks: never
    measure another job's cluster).
    """
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        # Joining a cluster (e.g. under `ray job submit`): the job's runtime env (--working-dir,
        # --runtime-env) already says where code comes from; do not override it.
        ray.init(address=address)
    else:
        log_dir = os.path.join(os.path.abspath(cfg.output_dir), "logs") if cfg.logging.quiet_actors else None
        if log_dir and not os.environ.get("RAY_RLHF_VERBOSE"):
            quiet_ray_notices(log_dir)
        ray.init(address="local" if private else None, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
                 include_dashboard=False,
                 runtime_env=local_runtime_env(log_dir), logging_level=logging.WARNING if log_dir else logging.INFO)
