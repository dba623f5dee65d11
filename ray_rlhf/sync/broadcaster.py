"""The one owner of getting the learner's weights into every generator's engine.

:class:`WeightBroadcaster` holds the backend (:mod:`ray_rlhf.sync.backends`), the collective
group and its membership (through the backend), the current version, the verify step and the
joining of new generators. The driver calls it with two verbs:

- :meth:`WeightBroadcaster.publish` ``(version, members)``: every live member loads the learner's
  current weights as ``version`` (one call per generator), then -- with verify on -- every
  engine's weights are read back and compared with the learner's checksum;
- :meth:`WeightBroadcaster.join` ``(new_members)``: generators that just started (holding the
  initial weights) are brought to the current version before they take work. The pool calls it.

Verify (``sync.verify``) compares, every sync, each generator's checksum of the tensors it
RECEIVED with the learner's (transport) and a read-back of what its ENGINE computes with (the
load). With ``sync.verify_parts = N > 1`` (the config's default: 4) the expensive part of the
read-back (probing the CPU-packed linear layers in full) rotates over N syncs, and every other
packed layer is probed on one sampled input feature: a wrong received tensor and a packed layer
the engine did not reload are caught at once, any other wrong element of a packed layer within N
syncs.

Members that do not answer (dead before the sync, or lost during it) are left out, the others
are synced, and the lost ids are reported in :attr:`SyncResult.lost` for the pool to replace.
Call path of one tensor: :meth:`publish` -> ``ObjectStoreBackend.send`` -> ``WeightSender.export``
in the learner -> object store -> ``WeightReceiver.load`` in each generator -> its engine's
``reload`` (vLLM ``reload_weights``). The learner and the generators are reached through
:func:`ray_rlhf.sync.remote.call`, never through methods of their own.
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
from ray_rlhf.sync.receiver import WeightReceiver
from ray_rlhf.sync.remote import call
from ray_rlhf.sync.sender import WeightSender
from ray_rlhf.sync.types import SyncResult
from ray_rlhf.sync.verify import check_probe, compare_checksums

log = logging.getLogger(__name__)

LOST_ERRORS = (RayActorError, GetTimeoutError)
"""What a call to a generator that is gone (or hung) raises."""

__all__ = ["LOST_ERRORS", "WeightBroadcaster", "check_probe", "compare_checksums"]


class WeightBroadcaster:
    """Versioned weight broadcast from one learner (``source``) to a pool of generators.

    Args:
        source: Ray actor handle of the learner rank that exports weights (a
            :class:`~ray_rlhf.sync.remote.WeightSource`).
        backend: ``"object_store"`` or ``"collective"`` (config ``sync.backend``).
        verify: read every engine's weights back and compare checksums after each sync.
        group_backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU) for the collective backend.
        ping_timeout_s: how long a member may take to answer before it counts as lost.
        verify_parts: the engine read-back in this many rotating parts (``sync.verify_parts``).
        adapter: ``lora.sync=adapter`` (the learner's export is an
            :class:`~ray_rlhf.sync.adapter.AdapterPayload`; object store only).
    """

    def __init__(self, source: Any, backend: str = "object_store", verify: bool = True,
                 group_backend: str = "gloo", ping_timeout_s: float = 60.0, verify_parts: int = 1,
                 adapter: bool = False):
        if adapter and backend != "object_store":
            raise ValueError("lora.sync=adapter sends the adapters with their config through the object store; "
                             "set sync.backend=object_store")
        if backend == "object_store":
            self.backend: ObjectStoreBackend | CollectiveBackend = ObjectStoreBackend(source)
        elif backend == "collective":
            self.backend = CollectiveBackend(source, group_backend)
        else:
            raise ValueError(f"unknown sync backend {backend!r} (sync.backend: object_store or collective)")
        self.source = source
        self.verify_weights = verify
        self.verify_parts = verify_parts
        """Engine read-back in this many rotating parts (``sync.verify_parts``)."""
        self.ping_timeout_s = ping_timeout_s
        self.adapter = adapter
        """``lora.sync=adapter``: the learner sends its LoRA adapters only; generators start with the
        base model and load the adapters of the current version (version 0 too) when they join."""
        self.version = 0
        """The version every member holds after the last :meth:`publish` (0: initial weights)."""
        self._initial = ObjectStoreBackend(source)  # joins, restores, staged versions: no group needed
        self.last: SyncResult | None = None
        """The last sync, join or restore, after its verify."""
        self._staged: dict[int, tuple[Any, Any]] = {}
        """Asynchronous runs: version -> (weights ref, learner checksum ref), exported by :meth:`stage`."""

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
        ref, checksum = self._staged.get(self.version, (None, None))
        if self.version or self.adapter:
            self._initial.send(self.version, members, self.verify_weights, ref=ref)
        self._verified(SyncResult(self.version, "join", 0, 0.0, len(members)), members, checksum)

    # ---- asynchronous runs: export now, load between rollout steps -----------------------------
    def stage(self, version: int, keep: int = 2) -> float:
        """Export the learner's weights as ``version`` into the object store (queued on the
        learner right after its update, before its next one) without loading them anywhere; the
        ``keep`` newest staged versions are kept. Returns the seconds spent submitting."""
        t0 = time.perf_counter()
        checksum = call(self.source, WeightSender.checksum) if self.verify_weights else None
        self._staged[version] = (call(self.source, WeightSender.export), checksum)
        for old in [v for v in self._staged if v <= version - keep and v != self.version]:
            del self._staged[old]
        return time.perf_counter() - t0

    def publish_staged(self, version: int, members: Mapping[str, Any]) -> SyncResult:
        """Load staged ``version`` into every live member (object store); lost ones are reported."""
        ref, checksum = self._staged[version]
        live, lost = self._answering(members, self.ping_timeout_s)
        try:
            result = self._initial.send(version, live, self.verify_weights, ref=ref)
        except LOST_ERRORS:
            live, more = self._answering(live, timeout_s=30.0)
            lost += more
            result = self._initial.send(version, live, self.verify_weights, ref=ref)
        self.version = version
        return self._verified(dataclasses.replace(result, lost=tuple(lost)), live, checksum)

    def deliver_staged(self, version: int, members: Mapping[str, Any]) -> list[Any]:
        """``rollout.partial``: leave staged ``version`` in every member's mailbox
        (:meth:`WeightReceiver.deliver`); each generator loads and verifies it at its next engine
        step, mid-generation (:mod:`ray_rlhf.generation.partial`), or when its next shard starts.
        Does not wait; returns the calls' refs (a dead member is found by the pool's next call)."""
        ref, checksum = self._staged[version]
        parts = self.verify_parts if version else 1
        return [call(g, WeightReceiver.deliver, version, ref, checksum, version % parts, parts)
                for g in members.values()]

    def held(self, version: int, members: Mapping[str, Any]) -> bool:
        """``rollout.partial``: whether every member already holds ``version`` or a newer one
        (loaded from its mailbox, verified there when verify is on); if so the oldest of them
        becomes the current version (what :meth:`join` brings new members to) and no load is needed."""
        try:
            infos = ray.get([call(g, WeightReceiver.status) for g in members.values()], timeout=self.ping_timeout_s)
        except LOST_ERRORS:  # a member is gone: a publish finds out which, and reports it lost
            return False
        if not infos or any(i.version < version for i in infos):
            return False
        self.version = min(i.version for i in infos)
        return True

    def restore(self, version: int, members: Mapping[str, Any]) -> SyncResult:
        """After a resume: the learner holds ``version``; load it everywhere (object store)."""
        self.version = version
        return self._verified(self._initial.send(version, members, self.verify_weights), members)

    def close(self, members: Mapping[str, Any]) -> None:
        self.backend.close(members)

    def set_source(self, source: Any, members: Mapping[str, Any]) -> None:
        """A new learner sends from now on (the old one died): its collective group is gone, and
        staged exports of the old learner are dropped."""
        try:
            self.backend.close(members)
        except Exception:  # noqa: BLE001 - the old rank 0 is dead: only the generators' side matters
            for g in members.values():
                try:
                    ray.get(call(g, WeightReceiver.leave_group))
                except Exception:  # noqa: BLE001 - a dead generator has nothing to leave
                    pass
        self.source = self.backend.source = self._initial.source = source
        if hasattr(self.backend, "_group"):
            self.backend._group = None
        self._staged.clear()

    # ---- helpers -------------------------------------------------------------------------------
    def _verified(self, result: SyncResult, members: Mapping[str, Any], learner_checksum: Any = None) -> SyncResult:
        """With verify on: every member's ENGINE holds the learner's weights at ``result.version``.

        Raises :class:`WeightSyncError` naming the generator and both checksums on a mismatch.
        """
        if not self.verify_weights or not members:
            self.last = result
            return result
        t0 = time.perf_counter()
        handles = list(members.values())
        parts = self.verify_parts if result.version else 1  # version 0: one full read-back
        part = result.version % parts
        # The learner hashes its weights while the generators read theirs back.
        full_ref = learner_checksum if learner_checksum is not None else call(self.source, WeightSender.checksum)
        got = ray.get([call(g, WeightReceiver.engine_checksum, part, parts) for g in handles]
                      + [call(g, WeightReceiver.status) for g in handles])
        full = ray.get(full_ref)
        compare_checksums(result.version, full, got[len(handles):], got[: len(handles)])
        probes = [e.probe_max_diff for e in got[: len(handles)] if e.probe_max_diff is not None]
        self.last = dataclasses.replace(result, checksum=full, verify_seconds=time.perf_counter() - t0,
                                        probe_max_diff=max(probes) if probes else None)
        return self.last

    @staticmethod
    def _answering(members: Mapping[str, Any], timeout_s: float) -> tuple[dict[str, Any], list[str]]:
        """(members that answer a ping within ``timeout_s``, ids of those that do not)."""
        refs = {gid: call(h, WeightReceiver.status) for gid, h in members.items()}
        live, lost = {}, []
        for gid, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
                live[gid] = members[gid]
            except LOST_ERRORS:
                lost.append(gid)
        return live, lost
