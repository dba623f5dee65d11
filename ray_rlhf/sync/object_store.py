"""Weight broadcast through Ray's object store (the default backend).

The learner actor's ``hf_state_dict()`` return value is stored ONCE in the object store; the
driver hands that ObjectRef to every generator's ``load_weights.remote(version, ref)``; Ray
resolves the ref inside each generator (a local shared-memory read on the same node, a pull over
the network otherwise) and the generator loads it into its engine with one ``reload_weights``.
The driver never materialises the weights.
"""

from __future__ import annotations

import time

from ray_rlhf.sync.base import SyncResult, call, verify, wait


def broadcast_object_store(learner, generators: list, version: int, verify_weights: bool = True) -> SyncResult:
    """Publish ``version``: one export on the learner, one ``load_weights`` per generator, concurrent.

    ``learner`` and ``generators`` are Ray actor handles (or in-process objects in tests).
    Returns a :class:`SyncResult`; with ``verify_weights`` also checks every engine's checksum
    against the learner's and raises :class:`ray_rlhf.sync.base.WeightSyncError` on a mismatch.
    """
    t0 = time.perf_counter()
    ref = call(learner, "hf_state_dict")  # ObjectRef for an actor; the dict itself in-process
    reports = wait([call(g, "load_weights", version, ref, verify_weights) for g in generators])
    seconds = time.perf_counter() - t0
    nbytes = reports[0].bytes if reports else 0
    checksum, vsec = "", 0.0
    if verify_weights:
        checksum = wait([call(learner, "weights_checksum")])[0]
        vsec = verify(checksum, generators, version)
    return SyncResult(version, "object_store", nbytes, seconds, len(generators), checksum, vsec)
