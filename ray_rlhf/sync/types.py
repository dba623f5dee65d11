"""The records and the two typed surfaces of a weight broadcast.

:class:`WeightSource` is what the learner (rank 0 of the learner group) offers the broadcaster;
:class:`WeightSink` is what every generator offers. Both are implemented by plain classes that
run as Ray actors (:class:`~ray_rlhf.learning.learner.Learner`,
:class:`~ray_rlhf.generation.generator.Generator`), each delegating to the one object in this
package that does the work (:class:`~ray_rlhf.sync.sender.WeightSender`,
:class:`~ray_rlhf.sync.receiver.WeightReceiver`). The driver side is
:class:`~ray_rlhf.sync.broadcaster.WeightBroadcaster`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


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


@dataclass(frozen=True)
class SinkInfo:
    """A generator's answer to :meth:`WeightSink.weights_status`."""

    generator_id: str
    version: int
    received_checksum: str


class WeightSource(Protocol):
    """The learner's side of a sync (implemented by ``Learner``, delegating to ``WeightSender``)."""

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's weights under Hugging Face names, CPU tensors, value head excluded."""

    def weights_checksum(self, names: tuple[str, ...] | None = None) -> str:
        """Checksum of :meth:`hf_state_dict` (restricted to ``names`` if given)."""

    def weight_group_open(self, world_size: int, backend: str, timeout_s: float) -> GroupInfo:
        """Serve a new collective group of ``world_size`` (this process is rank 0)."""

    def weight_group_connect(self) -> None:
        """Publish the tensor layout and wait for every receiver to join."""

    def weight_group_send(self, version: int) -> SyncResult:
        """Broadcast the current weights as ``version`` over the open group."""

    def weight_group_close(self) -> None:
        """Tear the group down."""


class WeightSink(Protocol):
    """A generator's side of a sync (implemented by ``Generator``, delegating to ``WeightReceiver``)."""

    def load_weights(self, version: int, weights: dict[str, torch.Tensor], record_checksum: bool) -> LoadReport:
        """Load a full HF-named state dict into the engine as ``version`` (object-store backend)."""

    def join_weight_group(self, info: GroupInfo, rank: int) -> None:
        """Join the learner's collective group as ``rank`` >= 1."""

    def receive_weights(self, version: int, record_checksum: bool) -> LoadReport:
        """Take part in one collective broadcast and load what arrived as ``version``."""

    def leave_weight_group(self) -> None:
        """Leave the collective group, if in one."""

    def weights_checksum(self, part: int = 0, parts: int = 1) -> EngineChecksum:
        """Checksum of the weights the engine computes with, read back from the engine (all of
        them, or the cheap ones plus rotating ``part`` of ``parts`` of the probed ones)."""

    def weights_status(self) -> SinkInfo:
        """Id, version and received-tensor checksum."""
