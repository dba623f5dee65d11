"""Versioned weight broadcast from the learner to the generators: bytes only.

Driver side: :class:`~ray_rlhf.sync.broadcaster.WeightBroadcaster` (the owner) and its backends
(:mod:`.backends`). Learner side: :class:`~ray_rlhf.sync.sender.WeightSender`. Generator side:
:class:`~ray_rlhf.sync.receiver.WeightReceiver`, loading into an engine it is handed. Shared:
records (:mod:`.types`), checksums (:mod:`.checksum`), the adapter-only payload and its delivery
checks (:mod:`.adapter`, ``lora.sync=adapter``), the collective transport
(:mod:`.collective`, :mod:`.flat`) and the typed way into the actors that hold the sender and the
receivers (:mod:`.remote`). Nothing here imports the learner or the generator (an import-linter
contract); the vLLM engine's load and read-back live with the generator
(``ray_rlhf.generation.vllm_engine``).
"""
