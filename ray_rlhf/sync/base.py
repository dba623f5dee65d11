"""Versioned weight broadcast: the records, the learner-side contract and the verify step.

One sync = the learner's Hugging Face-named state dict reaches every generator's vLLM engine in
one call per generator (never one call per parameter) and the generators' version becomes ``v``.
Two backends sit behind the same driver-side call, :func:`broadcast`:

- ``object_store`` (:mod:`ray_rlhf.sync.object_store`): one object in Ray's object store, pulled
  by every generator.
- ``collective`` (:mod:`ray_rlhf.sync.collective`): a torch.distributed broadcast (gloo on CPU,
  NCCL on GPU) of one flat buffer per dtype, over a group built for the current pool.

The learner actor implements :class:`WeightSource` (plus the ``weight_group_*`` methods of
:class:`ray_rlhf.sync.collective.CollectiveSourceMixin` for the collective backend). Generators are
:class:`ray_rlhf.generator.Generator` actors. Every driver-side function accepts Ray actor handles
or plain in-process objects, so the same code runs in unit tests without Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from ray_rlhf.sync.checksum import state_dict_checksum  # noqa: F401  (re-exported)


class WeightSyncError(RuntimeError):
    """A generator does not hold the weights the learner sent (checksum or version mismatch)."""


@dataclass(frozen=True)
class SyncResult:
    """What one weight sync cost and proved."""

    version: int
    """Policy version every generator now holds."""
    backend: str
    """``"object_store"`` or ``"collective"``."""
    bytes: int
    """Payload size of the state dict (one copy)."""
    seconds: float
    """Wall time from the learner's export to the last generator's engine holding the weights
    (verify excluded)."""
    num_generators: int
    checksum: str = ""
    """The learner's :func:`state_dict_checksum`, matched by every generator's engine; empty when
    verify was off."""
    verify_seconds: float = 0.0
    """Wall time of the verify step (engine read-back + hashing on every generator)."""


@dataclass(frozen=True)
class LoadReport:
    """Returned by ``Generator.load_weights`` for one load."""

    version: int
    bytes: int
    seconds: float
    """Time inside the engine's ``reload_weights``."""
    received_checksum: str = ""
    """:func:`state_dict_checksum` of the tensors as they arrived in the generator (before the
    engine saw them); empty when not asked for."""


class WeightSource(Protocol):
    """What the driver calls on the learner actor for a sync."""

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy LM's weights in Hugging Face checkpoint naming (``model.layers.0...``),
        detached CPU tensors in the dtype the generators run, value head excluded."""

    def weights_checksum(self) -> str:
        """``state_dict_checksum(self.hf_state_dict())``."""


def call(obj, method: str, *args, **kwargs):
    """``obj.method(*args)`` for a plain object, ``obj.method.remote(*args)`` for an actor handle."""
    fn = getattr(obj, method)
    remote = getattr(fn, "remote", None)
    return remote(*args, **kwargs) if remote is not None else fn(*args, **kwargs)


def wait(results: list):
    """Resolve the results of :func:`call`: ObjectRefs through one ``ray.get``, values as they are."""
    if not results:
        return []
    try:
        import ray

        is_ref = [isinstance(r, ray.ObjectRef) for r in results]
    except ImportError:  # pragma: no cover - ray is a hard dependency
        is_ref = [False] * len(results)
    if not any(is_ref):
        return list(results)
    got = iter(ray.get([r for r, ref in zip(results, is_ref) if ref]))
    return [next(got) if ref else r for r, ref in zip(results, is_ref)]


def verify(learner_checksum: str, generators: list, version: int) -> float:
    """Check that every generator's ENGINE holds the learner's weights at ``version``.

    Compares each generator's ``weights_checksum()`` (a read-back of the engine's weights, see
    :mod:`ray_rlhf.sync.vllm_readback`) with ``learner_checksum`` and its ``version`` with
    ``version``. Raises :class:`WeightSyncError` naming the generator and both checksums on the
    first mismatch. Returns the seconds spent.
    """
    t0 = time.perf_counter()
    n = len(generators)
    out = wait([call(g, "weights_checksum") for g in generators] + [call(g, "info") for g in generators])
    sums, infos = out[:n], out[n:]
    for checksum, info in zip(sums, infos):
        gid = info.get("generator_id", "?")
        if info.get("version") != version:
            raise WeightSyncError(f"generator {gid} holds version {info.get('version')}, expected {version}")
        if checksum != learner_checksum:
            raise WeightSyncError(
                f"generator {gid} engine weights checksum {checksum} != learner checksum {learner_checksum} "
                f"at version {version} (received-tensor checksum {info.get('received_checksum', '?')}: "
                "equal to the learner's means the engine load failed, different means transport corrupted it)"
            )
    return time.perf_counter() - t0


def broadcast(backend: str, learner, generators: list, version: int, verify_weights: bool = True) -> SyncResult:
    """Send the learner's current weights to every generator as ``version`` (config ``sync.backend``).

    For ``collective`` the group must be open (:func:`ray_rlhf.sync.collective.open_group`).
    """
    if backend == "object_store":
        from ray_rlhf.sync.object_store import broadcast_object_store

        return broadcast_object_store(learner, generators, version, verify_weights)
    if backend == "collective":
        from ray_rlhf.sync.collective import broadcast_collective

        return broadcast_collective(learner, generators, version, verify_weights)
    raise ValueError(f"unknown sync backend {backend!r} (sync.backend: object_store or collective)")
