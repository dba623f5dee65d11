"""How the weights travel, driver side: one call per sync from every generator's point of view.

- :class:`ObjectStoreBackend`: the learner's export is ONE object in Ray's object store; every
  generator's ``WeightReceiver.load`` receives that ObjectRef, Ray resolves it in the generator (shared
  memory on the same node, one pull over the network otherwise) and the engine loads it with one
  ``reload_weights``. The driver never materialises the weights.
- :class:`CollectiveBackend`: a torch.distributed broadcast (gloo on CPU, NCCL on GPU) from the
  learner (rank 0) to the generators (ranks 1..N) of a group built for the current membership;
  one flat buffer per dtype (:mod:`ray_rlhf.sync.collective`). A membership change closes the
  group and opens a new one.

Both are used only by :class:`~ray_rlhf.sync.broadcaster.WeightBroadcaster`; ``source`` is the
Ray actor handle of the learner (a :class:`~ray_rlhf.sync.remote.WeightSource`), ``members`` maps
generator ids to Ray actor handles of :class:`~ray_rlhf.sync.remote.WeightSink` s. Every call into
them runs a method of their :class:`~ray_rlhf.sync.sender.WeightSender` or
:class:`~ray_rlhf.sync.receiver.WeightReceiver` there (:func:`ray_rlhf.sync.remote.call`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray

from ray_rlhf.sync.receiver import WeightReceiver
from ray_rlhf.sync.remote import call
from ray_rlhf.sync.sender import WeightSender
from ray_rlhf.sync.types import SyncResult


class ObjectStoreBackend:
    name = "object_store"

    def __init__(self, source: Any):
        self.source = source

    def send(self, version: int, members: Mapping[str, Any], record_checksum: bool, ref: Any = None) -> SyncResult:
        """``ref``: weights already exported (a staged version); else the learner exports now."""
        t0 = time.perf_counter()
        ref = ref if ref is not None else call(self.source, WeightSender.export)
        reports = ray.get([call(g, WeightReceiver.load, version, ref, record_checksum) for g in members.values()])
        nbytes = reports[0].bytes if reports else 0
        return SyncResult(version, self.name, nbytes, time.perf_counter() - t0, len(members),
                          payload=reports[0].payload if reports else "full")

    def close(self, members: Mapping[str, Any]) -> None:
        pass


class CollectiveBackend:
    name = "collective"

    def __init__(self, source: Any, group_backend: str = "gloo", timeout_s: float = 300.0):
        self.source, self.group_backend, self.timeout_s = source, group_backend, timeout_s
        self._group: tuple[str, ...] | None = None
        """Member ids in rank order (rank i+1) of the open group, None when none is open."""

    def send(self, version: int, members: Mapping[str, Any], record_checksum: bool) -> SyncResult:
        if self._group != tuple(members):
            self._open(members)
        t0 = time.perf_counter()
        refs = [call(self.source, WeightSender.group_send, version)]
        refs += [call(g, WeightReceiver.receive, version, record_checksum) for g in members.values()]
        sent = ray.get(refs)[0]
        return SyncResult(version, self.name, sent.bytes, time.perf_counter() - t0, len(members))

    def _open(self, members: Mapping[str, Any]) -> None:
        """A group for exactly ``members``: learner rank 0, ``members`` in order as ranks 1..N."""
        self.close(members)
        info = ray.get(call(self.source, WeightSender.group_open, len(members) + 1, self.group_backend, self.timeout_s))
        joins = [call(g, WeightReceiver.join_group, info, i + 1) for i, g in enumerate(members.values())]
        ray.get([call(self.source, WeightSender.group_connect)] + joins)
        self._group = tuple(members)

    def close(self, members: Mapping[str, Any]) -> None:
        """Tear the open group down on the learner and on every member still alive."""
        if self._group is None:
            return
        for g in members.values():
            try:
                ray.get(call(g, WeightReceiver.leave_group))
            except Exception:  # noqa: BLE001 - a dead actor has nothing to leave
                pass
        ray.get(call(self.source, WeightSender.group_close))
        self._group = None
