"""Weight broadcast over torch.distributed: learner = rank 0, generators = ranks 1..N.

Standalone process groups. Each generator's vLLM engine already owns the process's DEFAULT
torch.distributed group (world size 1), so ``init_process_group`` cannot be called again there
(the clash ENV-NOTES warns about). Instead each pool membership gets its own group built from
objects, touching no global state: a ``TCPStore`` served by the learner on a free port, a
``PrefixStore`` named after the group, and a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL``
(GPU) constructed directly. Collectives are called on that backend object, so ranks are
group-local (``torch.distributed.broadcast`` would map them through the default group). Closing
the group and opening a new one is how the pool grows or shrinks: :func:`open_group` /
:func:`close_group`.

Per group, the sender publishes the :class:`~ray_rlhf.sync.flat.FlatLayout` (name, shape, dtype,
offset of every tensor) once in the store; receivers allocate their buffers from it. Per sync,
the sender broadcasts a 2-element header (version, layout fingerprint) and then ONE flat buffer
per dtype (a single call for a single-dtype model); receivers unflatten into views and load them
through ``WeightReceiver.load`` -- the same path as the object-store backend.

This module is the transport only. The learner owns a :class:`CollectiveSender` (through
:class:`~ray_rlhf.sync.sender.WeightSender`), each generator a :class:`CollectiveReceiver`
(through :class:`~ray_rlhf.sync.receiver.WeightReceiver`); the group's membership is decided on
the driver by :class:`~ray_rlhf.sync.backends.CollectiveBackend`.
"""

from __future__ import annotations

import datetime
import time
import uuid
import zlib

import torch
import torch.distributed as dist

from ray_rlhf.sync.flat import FlatLayout, flatten, layout_of, unflatten
from ray_rlhf.sync.types import GroupInfo, SyncResult, WeightSyncError


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # pragma: no cover
        pass
    return "127.0.0.1"


def _device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _make_group(info: GroupInfo, store, rank: int):
    timeout = datetime.timedelta(seconds=info.timeout_s)
    if info.backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_node_ip())]
        return dist.ProcessGroupGloo(store, rank, info.world_size, opts)
    if info.backend == "nccl":  # GPU clusters only; not exercised on CPU CI
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, info.world_size, opts)
    raise ValueError(f"unknown collective backend {info.backend!r} (gloo or nccl)")


def _broadcast(pg, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait()


def _fingerprint(layout: FlatLayout) -> int:
    return zlib.crc32(layout.to_json().encode())


def _shutdown(pg) -> None:
    if pg is not None and hasattr(pg, "shutdown"):
        try:
            pg.shutdown()
        except Exception:  # noqa: BLE001 - a peer may already be gone
            pass


class CollectiveSender:
    """Rank 0 of a weight group; owned by the learner actor. ``open`` -> ``connect`` -> ``send``* -> ``close``."""

    def __init__(self):
        self.info: GroupInfo | None = None
        self._store = None
        self._pg = None
        self._layout: FlatLayout | None = None

    def open(self, world_size: int, backend: str = "gloo", timeout_s: float = 300.0) -> GroupInfo:
        """Serve a fresh TCPStore on a free port; returns what the receivers need to join."""
        self.close()
        host = _node_ip()
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        self.info = GroupInfo(host, store.port, f"weights-{uuid.uuid4().hex[:12]}", world_size, backend, timeout_s)
        self._store = dist.PrefixStore(self.info.group_name, store)
        self._tcp_store = store
        return self.info

    def connect(self, state) -> None:
        """Publish the layout of ``state`` and build the group; blocks until every receiver joined."""
        if self.info is None:
            raise RuntimeError("CollectiveSender.connect before open")
        self._layout = layout_of(state)
        self._store.set("layout", self._layout.to_json())
        self._pg = _make_group(self.info, self._store, 0)

    def send(self, state, version: int) -> SyncResult:
        """Broadcast ``state`` (same names/shapes/dtypes as at ``connect``) as ``version``."""
        if self._pg is None:
            raise RuntimeError("CollectiveSender.send before connect")
        t0 = time.perf_counter()
        _, bufs = flatten(state, self._layout, device=_device(self.info.backend))
        header = torch.tensor([int(version), _fingerprint(self._layout)], dtype=torch.int64, device=_device(self.info.backend))
        _broadcast(self._pg, header)
        for d in sorted(bufs):
            _broadcast(self._pg, bufs[d])
        return SyncResult(version, "collective", self._layout.nbytes, time.perf_counter() - t0, self.info.world_size - 1)

    def close(self) -> None:
        _shutdown(self._pg)
        self._pg = self._store = self._layout = self.info = None
        self._tcp_store = None


class CollectiveReceiver:
    """Rank >= 1 of a weight group; owned by a generator's receiver (``WeightReceiver.join_group``)."""

    def __init__(self, info: GroupInfo, rank: int):
        timeout = datetime.timedelta(seconds=info.timeout_s)
        self.info, self.rank = info, rank
        self._tcp_store = dist.TCPStore(info.host, info.port, info.world_size, is_master=False, timeout=timeout)
        self._store = dist.PrefixStore(info.group_name, self._tcp_store)
        self.layout = FlatLayout.from_json(self._store.get("layout"))  # waits for the sender
        self._pg = _make_group(info, self._store, rank)
        self._bufs = self.layout.empty_buffers(_device(info.backend))

    def receive(self, version: int) -> list[tuple[str, torch.Tensor]]:
        """Take part in one broadcast; returns (name, view) pairs into buffers reused next time."""
        header = torch.zeros(2, dtype=torch.int64, device=_device(self.info.backend))
        _broadcast(self._pg, header)
        got_version, fp = (int(x) for x in header.tolist())
        if fp != _fingerprint(self.layout):  # buffers would not line up: cannot even take part
            raise WeightSyncError(
                f"rank {self.rank} of {self.info.group_name}: layout fingerprint {fp} != {_fingerprint(self.layout)}; "
                "rebuild the group"
            )
        for d in sorted(self._bufs):  # take part even on a version mismatch, so the sender is not left hanging
            _broadcast(self._pg, self._bufs[d])
        if got_version != version:
            raise WeightSyncError(
                f"rank {self.rank} of {self.info.group_name}: expected version {version}, the learner sent {got_version}"
            )
        return unflatten(self.layout, self._bufs)

    def close(self) -> None:
        _shutdown(self._pg)
        self._pg = self._bufs = self._store = self._tcp_store = None
