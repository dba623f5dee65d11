"""The learner's side of a weight broadcast: export, checksum, and the collective group's rank 0.

:class:`WeightSender` is held by the learner (rank 0 of the learner group) as its attribute
``weights``, built with a callable that returns the policy's current state dict; the broadcaster
runs its methods inside the learner actor with :func:`ray_rlhf.sync.remote.call`
(e.g. ``call(learner, WeightSender.export)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ray_rlhf.sync.adapter import AdapterPayload
from ray_rlhf.sync.checksum import state_dict_checksum
from ray_rlhf.sync.collective import CollectiveSender
from ray_rlhf.sync.flat import FlatPayload
from ray_rlhf.sync.types import GroupInfo, SyncResult


class WeightSender:
    """Exports the policy's Hugging Face-named weights; rank 0 of a collective group when asked.

    ``state_dict()`` returns the policy LM's state dict as the generators load it (Hugging Face
    names, the generators' dtype, value head excluded). It is called at each export, so the
    weights are always the current ones.
    """

    def __init__(self, state_dict: Callable[[], dict[str, torch.Tensor]],
                 adapter: Callable[[], AdapterPayload] | None = None):
        self._state_dict = state_dict
        self._adapter = adapter
        """``lora.sync=adapter``: returns the current adapters (and probe); what :meth:`export` sends."""
        self._collective: CollectiveSender | None = None

    def export(self) -> FlatPayload | AdapterPayload:
        """A CPU copy of the current weights as a :class:`~ray_rlhf.sync.flat.FlatPayload` (what
        the object-store backend ships), or with ``adapter``: the current
        :class:`~ray_rlhf.sync.adapter.AdapterPayload`."""
        if self._adapter is not None:
            return self._adapter()
        return FlatPayload.of(self._state_dict())

    def checksum(self, names: tuple[str, ...] | None = None) -> str:
        """:func:`~ray_rlhf.sync.checksum.state_dict_checksum` of the current weights (only
        ``names``, if given); with ``adapter``: the adapters' :func:`~ray_rlhf.sync.adapter.adapter_checksum`."""
        if self._adapter is not None:
            return self._adapter().checksum()
        return state_dict_checksum(self._state_dict(), names)

    def group_open(self, world_size: int, backend: str = "gloo", timeout_s: float = 300.0) -> GroupInfo:
        if self._collective is None:
            self._collective = CollectiveSender()
        return self._collective.open(world_size, backend, timeout_s)

    def group_connect(self) -> None:
        self._collective.connect(self._state_dict())

    def group_send(self, version: int) -> SyncResult:
        return self._collective.send(self._state_dict(), version)

    def group_close(self) -> None:
        if self._collective is not None:
            self._collective.close()
