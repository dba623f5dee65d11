"""The one owner of getting the learner's weights into every generator's engine.

:class:`WeightBroadcaster` holds the backend (:mod:`ray_rlhf.sync.backends`), the collective
group and its membership (through the backend), the current version, the verify step and the
joining of new generators. The driver calls it with two verbs:

- :meth:`WeightBroadcaster.publish` ``(version, members)``: every live member loads the learner's
  current weights as ``version`` (one call per generator), then -- with verify on -- every
  engine's weights are read back and compared with the learner's checksum;
- :meth:`WeightBroadcaster.join` ``(new_members)``: generators that just started (holding the
  initial weights) are brought to the current version before they take work. The pool calls it.

Members that do not answer (dead before the sync, or lost during it) are left out, the others
are synced, and the lost ids are reported in :attr:`SyncResult.lost` for the pool to replace.
Call path of one tensor: :meth:`publish` -> ``ObjectStoreBackend.send`` ->
``Learner.hf_state_dict`` (-> ``WeightSender.export``) -> object store -> ``Generator.load_weights``
-> ``WeightReceiver.load`` -> ``VllmEngine.reload`` -> vLLM ``reload_weights``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ray_rlhf.sync.backends import CollectiveBackend, ObjectStoreBackend
from ray_rlhf.sync.types import SinkInfo, SyncResult, WeightSyncError

log = logging.getLogger(__name__)

LOST_ERRORS = (RayActorError, GetTimeoutError)
"""What a call to a generator that is gone (or hung) raises."""


def compare_checksums(expected: str, version: int, engine_sums: list[str], sinks: list[SinkInfo]) -> None:
    """The verify step's verdict: every engine read-back checksum equals the learner's
    ``expected`` and every sink holds ``version``; else :class:`WeightSyncError` naming the first
    generator that differs and both checksums."""
    for checksum, info in zip(engine_sums, sinks, strict=True):
        if info.version != version:
            raise WeightSyncError(f"generator {info.generator_id} holds version {info.version}, expected {version}")
        if checksum != expected:
            raise WeightSyncError(
                f"generator {info.generator_id} engine weights checksum {checksum} != learner checksum {expected} "
                f"at version {version} (received-tensor checksum {info.received_checksum or '?'}: "
                "equal to the learner's means the engine load failed, different means transport corrupted it)"
            )


class WeightBroadcaster:
    """Versioned weight broadcast from one learner (``source``) to a pool of generators.

    Args:
        source: Ray actor handle of the learner rank that exports weights (a ``WeightSource``).
        backend: ``"object_store"`` or ``"collective"`` (config ``sync.backend``).
        verify: read every engine's weights back and compare checksums after each sync.
        group_backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU) for the collective backend.
        ping_timeout_s: how long a member may take to answer before it counts as lost.
    """

    def __init__(self, source: Any, backend: str = "object_store", verify: bool = True,
                 group_backend: str = "gloo", ping_timeout_s: float = 60.0):
        if backend == "object_store":
            self.backend: ObjectStoreBackend | CollectiveBackend = ObjectStoreBackend(source)
        elif backend == "collective":
            self.backend = CollectiveBackend(source, group_backend)
        else:
            raise ValueError(f"unknown sync backend {backend!r} (sync.backend: object_store or collective)")
        self.source = source
        self.verify_weights = verify
        self.ping_timeout_s = ping_timeout_s
        self.version = 0
        """The version every member holds after the last :meth:`publish` (0: initial weights)."""
        self._initial = ObjectStoreBackend(source)  # joins and restores: no group needed

    # ---- the two verbs -------------------------------------------------------------------------
    def publish(self, version: int, members: Mapping[str, Any]) -> SyncResult:
        """Bring every live member of ``members`` (id -> generator handle) to ``version``."""
        live, lost = self._answering(members, self.ping_timeout_s)
        try:
            result = self.backend.send(version, live, self.verify_weights)
        except (*LOST_ERRORS, RayTaskError) as e:
            # A collective peer's death surfaces on the learner as a task error; survivors left
            # blocked in the collective do not answer within the timeout and are dropped too.
            live, more = self._answering(live, timeout_s=30.0)
            if not more:
                raise
            log.warning("generator(s) %s lost during the weight sync (%s); syncing the others again",
                        more, type(e).__name__)
            lost += more
            result = self.backend.send(version, live, self.verify_weights)
        self.version = version
        return self._verified(dataclasses.replace(result, lost=tuple(lost)), live)

    def join(self, members: Mapping[str, Any]) -> None:
        """Bring newly started generators (holding the initial weights) to the current version.

        Raises ``RayActorError`` if one of them dies meanwhile (the pool drops it and retries).
        """
        if self.version:
            self._initial.send(self.version, members, self.verify_weights)
        self._verified(SyncResult(self.version, "join", 0, 0.0, len(members)), members)

    def restore(self, version: int, members: Mapping[str, Any]) -> SyncResult:
        """After a resume: the learner holds ``version``; load it everywhere (object store)."""
        self.version = version
        return self._verified(self._initial.send(version, members, self.verify_weights), members)

    def close(self, members: Mapping[str, Any]) -> None:
        self.backend.close(members)

    # ---- helpers -------------------------------------------------------------------------------
    def _verified(self, result: SyncResult, members: Mapping[str, Any]) -> SyncResult:
        """With verify on: every member's ENGINE holds the learner's weights at ``result.version``.

        Raises :class:`WeightSyncError` naming the generator and both checksums on a mismatch.
        """
        if not self.verify_weights:
            return result
        t0 = time.perf_counter()
        handles = list(members.values())
        expected = ray.get(self.source.weights_checksum.remote())
        got = ray.get([g.weights_checksum.remote() for g in handles] + [g.weights_status.remote() for g in handles])
        compare_checksums(expected, result.version, got[: len(handles)], got[len(handles):])
        return dataclasses.replace(result, checksum=expected, verify_seconds=time.perf_counter() - t0)

    @staticmethod
    def _answering(members: Mapping[str, Any], timeout_s: float) -> tuple[dict[str, Any], list[str]]:
        """(members that answer a ping within ``timeout_s``, ids of those that do not)."""
        refs = {gid: h.weights_status.remote() for gid, h in members.items()}
        live, lost = {}, []
        for gid, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
                live[gid] = members[gid]
            except LOST_ERRORS:
                lost.append(gid)
        return live, lost
