"""Checkpoints: atomic, complete or absent, newest M kept, resumable -- locally or in an object store.

The one owner of how checkpoints are stored. What a checkpoint holds is decided by its writers:
the learner's part (:mod:`ray_rlhf.learning.checkpointing`) and the driver's state
(:mod:`ray_rlhf.run.state`). The package:

==================  ===========================================================================
``layout.py``       the names: ``checkpoints/``, ``step_000010``, the ``COMPLETE`` marker, the files
``store.py``        :class:`Checkpoint`, :class:`Staging`, the stores' shared protocol (``save``)
``local.py``        :class:`LocalStore`: a local (or NFS) directory, temporary directory + rename
``objects.py``      :class:`ObjectStore`: ``s3://``, ``gs://``... (pyarrow), marker written last
``uri.py``          :func:`location` (where a run's checkpoints are), :func:`open_store`
``integrity.py``    :func:`validate` a local checkpoint file by file, :func:`check_compatible`
``resume.py``       :func:`find_resume`, :func:`read_state`, :func:`config_changes`
==================  ===========================================================================

Layout of ``<location>/checkpoints/step_000010/`` (``<location>``: ``checkpoint.location`` or
``output_dir``)::

    policy/                 the policy LM in Hugging Face format (safetensors + tokenizer)
    value_head.safetensors  the value head (critic/ too, with a separate critic; neither for a
                            critic-free estimator: learner.json says "critic": false)
    optimizer.pt            AdamW state (tensors and plain values; loaded with weights_only=True)
    rng.safetensors         torch RNG states of the learner
    learner.json            policy version, KL-controller state
    driver.json             step, data cursor, pool restarts, the resolved config
    pending/                (asynchronous runs) the scored batches of the next steps
    COMPLETE                written last; a checkpoint without it is never used

The verbs: ``store = open_store(location(cfg))``; ``store.save(step, write_parts, files, keep)``
(atomic: begin, the learner's part, the named files, commit, prune to the newest ``keep``);
``store.list_complete()`` / ``store.latest()``; ``store.fetch(ckpt, local_dir)`` and
``store.read_bytes(ckpt, name)`` to restore; ``store.prune(keep)``. Nothing is unpickled on load.

Every store keeps one promise: :meth:`~LocalStore.list_complete` returns only checkpoints whose
``COMPLETE`` marker exists and whose every file, as the marker lists it with its size, exists with
that size. A reader trusts nothing else. The marker (JSON)::

    {"format": 1, "step": 10, "save_id": "0002-1f0c9a3e", "files": {"driver.json": 412, ...}}

**Local directory** (the default; ``file://`` URIs too). The learner writes straight into
``checkpoints/.tmp-step_000010-<id>/``; ``COMPLETE`` goes in last and the directory is renamed to
``step_000010/``. A re-save of a step moves the old copy aside, renames the new one in, then
deletes the old copy (the old copy is put back if the rename fails). So a crash mid-write never
leaves a half checkpoint that resume would pick up.

**Object store** (no rename; one PUT is atomic and a listing sees every finished PUT)::

    checkpoints/step_000010/<save_id>/...          the files of one save
    checkpoints/step_000010/<save_id>/COMPLETE     written LAST

1. ``begin(step)`` picks ``save_id = <seq>-<random>``, ``seq`` one more than any save of that
   step already present, so a later save of a step sorts after an earlier one (no clocks).
2. Writers PUT their files under that sub-prefix: the learner uploads its part from its own node
   (:meth:`~ObjectStore.write_part`), the driver adds ``driver.json`` (``write_bytes``). Each
   returns ``{relative path: size}``.
3. ``commit`` checks that every returned file is listed with its size, then PUTs the marker.
4. Only then are the step's other saves (an older copy, torn attempts) deleted and old steps
   pruned. Deleting a save removes its marker first, so a half-deleted save is never complete.

A crash anywhere leaves either no new marker (the torn save is ignored, and removed by the next
prune; an older copy of the step is untouched) or a complete new save, perhaps with the older copy
beside it until the next prune (readers take the highest ``save_id``). Two saves never mix: a
marker names only files under its own ``save_id``. One writer per ``output_dir``: prune removes
unmarked saves, which could belong to a concurrent writer. A reader racing a prune of the very
checkpoint it fetches gets a missing-file error, never wrong bytes (sizes are checked).

URIs: ``s3://bucket/prefix?region=..&endpoint_override=host:port&scheme=http`` (without
``endpoint_override``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` is used, as pyarrow's
``from_uri`` does; credentials come from the usual AWS chain); ``gs://`` and anything else
:meth:`pyarrow.fs.FileSystem.from_uri` opens; then any installed fsspec protocol. A URI is the whole
address: pass it (not a store object) to actors on other nodes, whose environment may differ.
"""

from ray_rlhf.checkpoint.integrity import check_compatible, validate
from ray_rlhf.checkpoint.layout import FORMAT, MARKER, step_dir_name
from ray_rlhf.checkpoint.local import LocalStore
from ray_rlhf.checkpoint.objects import ObjectStore
from ray_rlhf.checkpoint.resume import RESUME_SENSITIVE, config_changes, find_resume, read_state
from ray_rlhf.checkpoint.store import Checkpoint, Staging, explain_error
from ray_rlhf.checkpoint.uri import CheckpointStore, check_writable, location, open_store

__all__ = ["FORMAT", "MARKER", "RESUME_SENSITIVE", "Checkpoint", "CheckpointStore", "LocalStore", "ObjectStore",
           "Staging", "check_compatible", "check_writable", "config_changes", "explain_error", "find_resume",
           "location", "open_store", "read_state", "step_dir_name", "validate"]
