"""The verify step's verdict: does every generator's engine hold the learner's weights?

Used by the broadcaster after each sync (:meth:`~ray_rlhf.sync.broadcaster.WeightBroadcaster.publish`)
and by a generator after it loads weights from its mailbox (``rollout.partial``,
:meth:`~ray_rlhf.sync.receiver.WeightReceiver.load_delivered`).
"""

from __future__ import annotations

from ray_rlhf.sync.adapter import LOGPROB_ATOL
from ray_rlhf.sync.types import EngineChecksum, SinkInfo, WeightSyncError


def compare_checksums(version: int, learner_checksum: str, sinks: list[SinkInfo],
                      engines: list[EngineChecksum]) -> None:
    """The verify step's verdict for every generator, or :class:`WeightSyncError` naming the
    first one that fails:

    - it holds ``version``;
    - after a load (version > 0): the tensors it RECEIVED have the learner's checksum (else the
      transport corrupted or lost one), and every tensor its ENGINE reads back equals the one it
      received (else the engine load failed);
    - at version 0 (weights loaded from the model directory): its engine's full read-back
      checksum equals the learner's;
    - adapter sync (``lora.sync=adapter``): its engine's probe log-probs equal the learner's and
      moved when the learner's did (:func:`check_probe`).
    """
    for info, engine in zip(sinks, engines, strict=True):
        gid = info.generator_id
        if info.version != version:
            raise WeightSyncError(f"generator {gid} holds version {info.version}, expected {version}")
        if version == 0:
            if engine.checksum != learner_checksum:
                raise WeightSyncError(f"generator {gid} engine weights checksum {engine.checksum} != learner checksum "
                                      f"{learner_checksum} at version 0: it did not load the learner's initial model")
            check_probe(gid, version, engine)
            continue
        if info.received_checksum != learner_checksum:
            raise WeightSyncError(
                f"generator {gid} received weights with checksum {info.received_checksum} != learner checksum "
                f"{learner_checksum} at version {version}: the transport corrupted or lost a tensor"
            )
        if engine.mismatched:
            raise WeightSyncError(
                f"generator {gid} engine computes with {len(engine.mismatched)} tensor(s) other than the ones it "
                f"received at version {version} ({', '.join(engine.mismatched[:3])}): the engine load failed"
            )
        check_probe(gid, version, engine)


def check_probe(gid: str, version: int, engine: EngineChecksum) -> None:
    """Adapter sync: the engine's probe log-probs moved with the learner's and equal them within
    :data:`~ray_rlhf.sync.adapter.LOGPROB_ATOL` (no-op for a full-weights sync)."""
    if engine.probe_max_diff is None:
        return
    if engine.probe_unchanged:
        raise WeightSyncError(f"generator {gid}: the adapter changed at version {version} but the engine's output did not "
                              "(its probe log-probs equal the previous version's): the engine serves a stale adapter")
    if not engine.probe_max_diff <= LOGPROB_ATOL:
        raise WeightSyncError(f"generator {gid}: engine log-probs of the probe tokens differ from the learner's by "
                              f"{engine.probe_max_diff:.2e} (> {LOGPROB_ATOL:g}) under adapter version {version}: the engine "
                              "does not compute with the learner's adapters (wrong adapter or scaling)")
