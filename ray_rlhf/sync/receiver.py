"""A generator's side of a weight broadcast: check, load into the engine, read back.

:class:`WeightReceiver` is held by each generator as its attribute ``weights``; the broadcaster
runs its methods inside the generator actor with :func:`ray_rlhf.sync.remote.call` (e.g.
``call(generator, WeightReceiver.load, version, ref, True)``). The engine itself is reached
through :class:`Engine`, which the generator hands in: one call that loads a full state dict
(vLLM's ``reload_weights``) and one that reads the weights the engine computes with back in
Hugging Face naming (the generator's :class:`~ray_rlhf.generation.vllm_engine.VllmEngine`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import torch

from ray_rlhf.sync.adapter import AdapterPayload, adapter_checksum, probe_check
from ray_rlhf.sync.checksum import (
    IGNORED_SUFFIXES,
    SAMPLE_SUFFIX,
    named_tensors,
    received_fingerprints,
    state_dict_checksum,
    tensor_bytes,
    tensor_digests,
)
from ray_rlhf.sync.flat import FlatPayload
from ray_rlhf.sync.types import EngineChecksum, GroupInfo, LoadReport, SinkInfo, WeightSyncError
from ray_rlhf.sync.verify import compare_checksums


class Engine(Protocol):
    """The two engine operations a weight load needs (and three more for adapter loads)."""

    def reload(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Load a full Hugging Face-named state dict in one call."""

    def read_back(self, part: int = 0, parts: int = 1, sample: int | None = None) -> dict[str, torch.Tensor]:
        """The weights the engine computes with, in Hugging Face naming (with ``parts > 1``: the
        cheap tensors and one rotating ``part`` of the expensive ones; with ``sample`` besides, one
        input feature of each other expensive one under its name + :data:`SAMPLE_SUFFIX`)."""

    def load_adapter(self, payload: AdapterPayload, version: int) -> None:
        """``lora.sync=adapter``: serve ``payload`` as a new adapter for all later generation."""

    def adapter_read_back(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, config) of the adapter the engine loaded last, read again from where it loaded them."""

    def probe_logprobs(self, token_ids: tuple[int, ...]) -> torch.Tensor:
        """The engine's log-prob of each token after the first under its current adapter. Shape: (T - 1,)."""


class WeightReceiver:
    """Loads versioned weights into one engine; joins and leaves collective groups.

    ``expected_names``: the engine's Hugging Face tensor names (from a read-back at start); a
    payload missing one of them or carrying an unknown one is refused before the engine is
    touched (vLLM would silently keep stale weights for a missing layer). None skips the check
    (tensor parallelism, where one process holds only shards).
    """

    def __init__(self, engine: Engine, generator_id: str, expected_names: set[str] | None):
        self.engine = engine
        self.generator_id = generator_id
        self.expected_names = expected_names
        self.version = 0
        """Version of the weights the engine holds (0: as loaded from the model directory)."""
        self.received_checksum = ""
        self.received_digests: dict[str, str] = {}
        """Per-tensor digests of the last load (what the engine must read back)."""
        self.received_samples: dict[str, tuple[str, str]] = {}
        """Digests of the sampled slices of the last load (:func:`sample_index` of its version):
        what a rotating read-back's sampled slice of each tensor must equal."""
        self._group = None  # CollectiveReceiver while in a group
        self.adapter: AdapterPayload | None = None
        """``lora.sync=adapter``: the adapters last loaded (their probe is what the verify compares)."""
        self._probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """Adapter sync: version -> (engine, learner) probe log-probs at its verify (two newest kept)."""
        self._mail: tuple[int, Any, Any, int, int] | None = None
        """``rollout.partial``: (version, weights, learner checksum, part, parts) delivered, not loaded yet."""
        self._mail_lock = threading.Lock()

    def load(self, version: int, weights, record_checksum: bool = True) -> LoadReport:
        """Load a full state dict (mapping, (name, tensor) pairs or a
        :class:`~ray_rlhf.sync.flat.FlatPayload`) as ``version``, or an
        :class:`~ray_rlhf.sync.adapter.AdapterPayload` (``lora.sync=adapter``) as a new adapter."""
        if isinstance(weights, AdapterPayload):
            return self._load_adapter(version, weights, record_checksum)
        if isinstance(weights, FlatPayload):
            weights = weights.pairs()
        pairs = [(n, t) for n, t in named_tensors(weights) if not n.endswith(IGNORED_SUFFIXES)]
        if self.expected_names is not None:
            got = {n for n, _ in pairs}
            missing, extra = self.expected_names - got, got - self.expected_names
            if missing or extra:
                raise WeightSyncError(
                    f"generator {self.generator_id}: version {version} payload is missing {sorted(missing)[:5]} "
                    f"and has unknown {sorted(extra)[:5]}; not loaded (still version {self.version})"
                )
        if record_checksum:
            self.received_checksum, self.received_digests, self.received_samples = received_fingerprints(
                pairs, sample_index(version))
        else:
            self.received_checksum, self.received_digests, self.received_samples = "", {}, {}
        t0 = time.perf_counter()
        self.engine.reload(pairs)
        seconds = time.perf_counter() - t0
        self.version = int(version)
        return LoadReport(self.version, tensor_bytes(pairs), seconds, self.received_checksum)

    # ---- rollout.partial: a mailbox that the generation loop empties between engine steps -------
    def deliver(self, version: int, weights, checksum: str | None = None, part: int = 0, parts: int = 1) -> int:
        """Leave ``version``'s weights for the generation loop to load at its next engine step
        (:meth:`load_delivered`). Runs in a concurrent actor call while the engine generates, so it
        only stores them (the engine is not thread-safe); a newer delivery replaces an older one.
        ``checksum``: the learner's (verify on), compared after the load; None: not verified."""
        with self._mail_lock:
            if version > self.version and (self._mail is None or version > self._mail[0]):
                self._mail = (int(version), weights, checksum, int(part), int(parts))
        return int(version)

    def pending(self) -> bool:
        """Whether delivered weights newer than the engine's wait to be loaded."""
        mail = self._mail
        return mail is not None and mail[0] > self.version

    def load_delivered(self) -> int:
        """Load the delivered weights (:meth:`load`) and, with a checksum, verify them as the
        broadcaster does after a sync (:func:`~ray_rlhf.sync.verify.compare_checksums`:
        :class:`WeightSyncError` on a mismatch). Call it from the thread that runs the engine.
        Returns the version the engine holds."""
        with self._mail_lock:
            mail, self._mail = self._mail, None
        if mail is None or mail[0] <= self.version:
            return self.version
        version, weights, checksum, part, parts = mail
        self.load(version, weights, record_checksum=checksum is not None)
        if checksum is not None:
            compare_checksums(version, checksum, [self.status()], [self.engine_checksum(part, parts)])
        return self.version

    def _load_adapter(self, version: int, payload: AdapterPayload, record_checksum: bool) -> LoadReport:
        config = payload.peft_config()
        self.received_checksum = adapter_checksum(payload.tensors, config) if record_checksum else ""
        self.received_digests = _adapter_digests(payload.tensors, config) if record_checksum else {}
        t0 = time.perf_counter()
        self.engine.load_adapter(payload, int(version))
        seconds = time.perf_counter() - t0
        self.adapter, self.version = payload, int(version)
        return LoadReport(self.version, payload.nbytes, seconds, self.received_checksum, payload="adapter")

    def join_group(self, info: GroupInfo, rank: int) -> None:
        from ray_rlhf.sync.collective import CollectiveReceiver

        self.leave_group()
        self._group = CollectiveReceiver(info, rank)

    def receive(self, version: int, record_checksum: bool = True) -> LoadReport:
        """Take part in one broadcast of the group and load what arrived."""
        if self._group is None:
            raise RuntimeError(f"generator {self.generator_id} is in no weight group; join_group first")
        return self.load(version, self._group.receive(version), record_checksum)

    def leave_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def engine_checksum(self, part: int = 0, parts: int = 1) -> EngineChecksum:
        """Checksum of the engine's read-back weights (all of them, or ``part`` of ``parts``) and
        the names it covers: equal to the learner's over those names iff they loaded exactly.
        Adapter sync: the adapter folder the engine loaded, read again, and the probe check."""
        if self.adapter is not None:
            return self._adapter_checksum()
        sampled = parts > 1 and bool(self.received_samples)
        state = self.engine.read_back(part, parts, sample_index(self.version)) if sampled else self.engine.read_back(part, parts)
        samples = {n[: -len(SAMPLE_SUFFIX)]: t for n, t in state.items() if n.endswith(SAMPLE_SUFFIX)}
        state = {n: t for n, t in state.items() if not n.endswith(SAMPLE_SUFFIX)}
        mismatched = set()
        if self.received_digests:
            got = tensor_digests(state)
            mismatched = {n for n, d in got.items() if self.received_digests.get(n) != d}
            got = tensor_digests(samples)
            mismatched |= {n for n, d in got.items() if d not in self.received_samples.get(n, ())}
        return EngineChecksum(tuple(sorted(state)), state_dict_checksum(state), tuple(sorted(mismatched)),
                              sampled=tuple(sorted(samples)))

    def _adapter_checksum(self) -> EngineChecksum:
        """Read-back (tensors + config, as :func:`~ray_rlhf.sync.adapter.adapter_checksum`) and the
        probe log-probs of the adapter the engine serves, against the learner's."""
        tensors, config = self.engine.adapter_read_back()
        mismatched = ()
        if self.received_digests:
            got = _adapter_digests(tensors, config)
            names = set(got) | set(self.received_digests)
            mismatched = tuple(sorted(n for n in names if self.received_digests.get(n) != got.get(n)))
        engine = self.engine.probe_logprobs(self.adapter.probe_ids)
        learner = self.adapter.probe_logprobs
        older = [v for v in self._probes if v < self.version]
        prev = self._probes[max(older)] if older else (None, None)
        check = probe_check(engine, learner, *prev)
        self._probes[self.version] = (engine, learner)
        for v in sorted(self._probes)[:-2]:
            del self._probes[v]
        return EngineChecksum((), adapter_checksum(tensors, config), mismatched, probe_max_diff=check.max_diff,
                              probe_unchanged=check.unchanged)

    def status(self) -> SinkInfo:
        return SinkInfo(self.generator_id, self.version, self.received_checksum)


def sample_index(version: int) -> int:
    """The input feature a rotating read-back samples of every probed layer after loading
    ``version`` (taken modulo each layer's width): a different one each version, so that over
    versions every feature comes up. Used by the generator alone: at the load (the received
    slices' digests) and at the read-back (the engine's slices)."""
    return (int(version) * 2654435761) % (1 << 31)


def _adapter_digests(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, str]:
    """Per-tensor digests of an adapter, its config as one more entry (``config``)."""
    digests = tensor_digests(tensors)
    digests["config"] = adapter_checksum({}, config)
    return digests
