"""What a generator makes of one shard, apart from the engine: request seeds, the batch, the report,
and the CPU binding of the generator's process.

Pure functions over plain data (NumPy, the records), used by
:class:`~ray_rlhf.generation.generator.Generator` and tested without vLLM.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptShard, RolloutBatch

__all__ = ["ShardReport", "bind_cpus", "core_list_for", "request_seed", "shard_batch"]

_SEED_RANGE = 2**31 - 2**16
"""Per-prompt seeds stay below 2**31 with room for vLLM's ``seed + j`` for sample ``j``."""


def request_seed(base: int | None, prompt_index: int) -> int | None:
    """The vLLM seed of one prompt's request: a hash of (``base``, ``prompt_index``).

    vLLM fans ``n`` samples out into child requests with seeds ``seed + j`` (j = sample index), so
    sample ``j`` of prompt ``i`` is fixed by (base, i, j) -- whichever generator or shard it lands
    in. ``None`` (no base seed) leaves sampling unseeded.
    """
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_RANGE


@dataclass(frozen=True)
class ShardReport:
    """The small first return of :meth:`~ray_rlhf.generation.generator.Generator.generate` (the batch is the second): what the
    pool needs to account for a shard without fetching its tokens."""

    shard_id: int
    generator_id: str
    sequences: int
    tokens: int
    """Response tokens generated."""
    seconds: float
    """Wall time inside the engine."""
    version: int
    """Weight version the shard was sampled with."""
    env: dict | None = None
    """Multi-turn shards: the environment counts (:class:`~ray_rlhf.generation.trajectory.EnvStats`)."""


def core_list_for(index: int, cores_per_engine: int = 1) -> str:
    """Round-robin core list for the ``index``-th engine, over the cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    start = (index * cores_per_engine) % len(cores)
    picked = [cores[(start + k) % len(cores)] for k in range(min(cores_per_engine, len(cores)))]
    return ",".join(str(c) for c in picked)


def bind_cpus(omp_threads_bind: str) -> None:
    """Apply a generator's ``omp_threads_bind`` to this process (module docstring of
    :mod:`ray_rlhf.generation.generator`): ``"auto"`` leaves vLLM's setting, ``"nobind"`` binds
    nothing, a core list (``"0-1,3"``) pins the process with ``sched_setaffinity``."""
    if omp_threads_bind == "auto":
        return
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
    if omp_threads_bind == "nobind":
        return
    cores: set[int] = set()
    for part in omp_threads_bind.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UserError(f"omp_threads_bind={omp_threads_bind!r}: expected 'nobind', 'auto' or cores like '0-1,3'")
        cores.update(range(int(lo), int(hi or lo) + 1))
    os.sched_setaffinity(0, cores)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))


def shard_batch(shard: PromptShard, rows: list[tuple], policy_version, generator_id: str,
                token_versions: list[list[int]] | None = None) -> RolloutBatch:
    """The :class:`RolloutBatch` of ``rows`` of (prompt item, sample index, token ids, log-probs,
    finish reason, text); ``policy_version``: one version or one per row; ``token_versions``: the
    version of every response token, per row (``rollout.partial``), or None."""
    prompts = list(shard.prompts)
    n = len(rows)
    plen = np.array([len(p.prompt_ids) for p, *_ in rows], dtype=np.int64)
    rlen = np.array([len(t) for _, _, t, *_ in rows], dtype=np.int64)
    batch = RolloutBatch(
        prompt_index=np.array([p.index for p, *_ in rows], dtype=np.int64).reshape(n),
        sample_index=np.array([j for _, j, *_ in rows], dtype=np.int64).reshape(n),
        policy_version=np.broadcast_to(np.asarray(policy_version, dtype=np.int64), (n,)).copy(),
        finish_reason=np.array([r[4] for r in rows], dtype=str).reshape(n),
        generator_id=np.full(n, generator_id),
        prompt_ids=np.concatenate([np.asarray(p.prompt_ids, np.int32) for p, *_ in rows] + [np.zeros(0, np.int32)]),
        prompt_offsets=np.concatenate([[0], np.cumsum(plen)]).astype(np.int64),
        response_ids=np.concatenate([np.asarray(t, np.int32) for _, _, t, *_ in rows] + [np.zeros(0, np.int32)]),
        response_offsets=np.concatenate([[0], np.cumsum(rlen)]).astype(np.int64),
        sampler_logprobs=np.concatenate([np.asarray(r[3], np.float32) for r in rows] + [np.zeros(0, np.float32)]),
        prompt=[p.text for p, *_ in rows], response=[r[5] for r in rows],
        reward=np.full(n, np.nan),
        columns={k: [p.columns[k] for p, *_ in rows] for k in (prompts[0].columns if prompts else {})},
        token_versions=None if token_versions is None else np.concatenate(
            [np.asarray(v, np.int64) for v in token_versions] + [np.zeros(0, np.int64)]),
    )
    if len(batch.sampler_logprobs) != len(batch.response_ids):
        raise RuntimeError(f"{generator_id}: vLLM returned {len(batch.sampler_logprobs)} logprobs for "
                           f"{len(batch.response_ids)} tokens")
    return batch
