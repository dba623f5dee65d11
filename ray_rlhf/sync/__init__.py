"""Versioned weight broadcast from the learner to the generators.

Driver side: :class:`~ray_rlhf.sync.broadcaster.WeightBroadcaster` (the owner) and its backends
(:mod:`.backends`). Learner side: :class:`~ray_rlhf.sync.sender.WeightSender`. Generator side:
:class:`~ray_rlhf.sync.receiver.WeightReceiver`. Shared: records and protocols (:mod:`.types`),
checksums (:mod:`.checksum`), the collective transport (:mod:`.collective`, :mod:`.flat`) and the
vLLM read-back (:mod:`.vllm_readback`).
"""
