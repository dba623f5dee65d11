"""The records of a weight broadcast: what a sync cost and proved, what a load reports, how to
reach a collective group, what an engine reads back.

Shared by the driver side (:class:`~ray_rlhf.sync.broadcaster.WeightBroadcaster`), the learner's
:class:`~ray_rlhf.sync.sender.WeightSender` and every generator's
:class:`~ray_rlhf.sync.receiver.WeightReceiver`; how the driver reaches those two inside their
actors is :mod:`ray_rlhf.sync.remote`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class WeightSyncError(RuntimeError):
    """A generator does not hold the weights the learner sent (checksum or version mismatch)."""


@dataclass(frozen=True)
class SyncResult:
    """What one weight sync cost and proved."""

    version: int
    """Policy version every live generator now holds."""
    backend: str
    """``"object_store"`` or ``"collective"``."""
    bytes: int
    """Payload size of the state dict (one copy)."""
    seconds: float
    """Wall time from the learner's export to the last generator's engine holding the weights
    (verify excluded)."""
    num_generators: int
    checksum: str = ""
    """The learner's checksum, matched by every generator's engine; empty when verify was off."""
    payload: str = "full"
    """``"full"``: the whole state dict (``lora.sync=merged`` too); ``"adapter"``: the LoRA adapters
    only (``lora.sync=adapter``); ``bytes`` counts that payload."""
    probe_max_diff: float | None = None
    """Adapter sync with verify: the largest |engine - learner| probe log-prob over the generators."""
    verify_seconds: float = 0.0
    """Wall time of the verify step (engine read-back + hashing on every generator)."""
    lost: tuple[str, ...] = field(default_factory=tuple)
    """Generators found dead before or during the sync (not synced; the pool replaces them)."""


@dataclass(frozen=True)
class LoadReport:
    """What a generator returns for one load."""

    version: int
    bytes: int
    seconds: float
    """Time inside the engine's ``reload_weights``."""
    received_checksum: str = ""
    """Checksum of the tensors as they arrived (before the engine saw them); empty when not asked."""
    payload: str = "full"
    """``"full"`` or ``"adapter"`` (:attr:`SyncResult.payload`)."""


@dataclass(frozen=True)
class GroupInfo:
    """How to reach one collective weight-broadcast group (made by the learner, sent to generators)."""

    host: str
    """Address of the learner's TCPStore (its node IP)."""
    port: int
    group_name: str
    """Unique per membership; prefixes every store key."""
    world_size: int
    """1 learner + number of generators."""
    backend: str = "gloo"
    """``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors)."""
    timeout_s: float = 300.0


@dataclass(frozen=True)
class EngineChecksum:
    """What a generator's engine computes with, read back: checksum, names covered, and the names
    whose read-back differs from the tensor the generator received for them."""

    names: tuple[str, ...]
    checksum: str
    mismatched: tuple[str, ...] = ()
    """Empty when every read-back tensor equals the received one (or nothing was received yet:
    the engine holds the weights it loaded from the model directory)."""
    sampled: tuple[str, ...] = ()
    """A rotating read-back (``sync.verify_parts > 1``): the tensors not in this part whose one
    sampled input feature was read back and compared (:data:`~ray_rlhf.sync.checksum.SAMPLE_SUFFIX`)."""
    probe_max_diff: float | None = None
    """Adapter sync (``lora.sync=adapter``): max |engine - learner| log-prob of the probe tokens
    under the adapter the engine now serves (:mod:`ray_rlhf.sync.adapter`); None for full weights."""
    probe_unchanged: bool = False
    """Adapter sync: the learner's probe log-probs moved since the last version, the engine's did not."""


@dataclass(frozen=True)
class SinkInfo:
    """A generator's answer to :meth:`~ray_rlhf.sync.receiver.WeightReceiver.status`."""

    generator_id: str
    version: int
    received_checksum: str
