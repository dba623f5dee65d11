"""Where checkpoints live: a local directory, or an object store (``s3://``, ``gs://``, ...).

:func:`open_store` turns ``output_dir`` (a path or a URI) into a store; checkpoints go under
``<output_dir>/checkpoints/``. Every store keeps one promise: :meth:`~LocalStore.list_complete`
returns only checkpoints whose ``COMPLETE`` marker exists and whose every file, as the marker
lists it with its size, exists with that size. A reader trusts nothing else. The marker (JSON)::

    {"format": 1, "step": 10, "save_id": "0002-1f0c9a3e", "files": {"driver.json": 412, ...}}

**Local directory** (the default; ``file://`` URIs too): today's semantics and speed. The learner
writes straight into ``checkpoints/.tmp-step_000010-<id>/``; ``COMPLETE`` goes in last and the
directory is renamed to ``step_000010/``. A re-save of a step moves the old copy aside, renames
the new one in, then deletes the old copy (the old copy is put back if the rename fails).

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

from ray_rlhf.storage.base import FORMAT, MARKER, Checkpoint, Staging, explain_error, step_dir_name
from ray_rlhf.storage.local import LocalStore
from ray_rlhf.storage.objects import ObjectStore
from ray_rlhf.storage.uri import CheckpointStore, open_store

__all__ = ["FORMAT", "MARKER", "Checkpoint", "CheckpointStore", "LocalStore", "ObjectStore", "Staging", "explain_error",
           "open_store", "step_dir_name"]
