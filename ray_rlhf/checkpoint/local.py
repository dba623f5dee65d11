"""Checkpoints in a local directory (rename-based atomic commit; see :mod:`ray_rlhf.checkpoint`)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from ray_rlhf.checkpoint.layout import MARKER, STEP_PREFIX, step_dir_name, step_of
from ray_rlhf.checkpoint.store import Checkpoint, Staging, _check_keep, _local_sizes, _Store
from ray_rlhf.errors import UserError


class LocalStore(_Store):
    """Checkpoints in a local (or NFS) directory: temporary directory + rename, as before."""

    def __init__(self, root: str | Path):
        super().__init__(pafs.LocalFileSystem(), os.path.abspath(root), str(root))

    def check_writable(self) -> None:
        """Fail early (before any expensive work) if checkpoints cannot be written."""
        d = Path(self.checkpoints)
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{uuid.uuid4().hex}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write checkpoints to {d}: {e.strerror or e}; "
                            "set output_dir to a writable directory") from None

    def begin(self, step: int) -> Staging:
        save_id = uuid.uuid4().hex[:8]
        tmp = Path(self.checkpoints) / f".tmp-{step_dir_name(step)}-{save_id}"
        tmp.mkdir(parents=True)
        return Staging(step, save_id, str(tmp))

    def write_part(self, staging: Staging, write: Callable[[Path], None]) -> dict[str, int]:
        """``write(directory)`` writes straight into the staging directory; returns the sizes."""
        write(Path(staging.path))
        return _local_sizes(staging.path)

    def commit(self, staging: Staging, files: dict[str, int], keep: int) -> Checkpoint:
        """Marker into the staging directory, then rename it into place; then prune."""
        final = Path(self.checkpoints) / step_dir_name(staging.step)
        old: Path | None = None
        try:
            self._check_written(staging, files)
            self.write_marker(staging.path, staging.step, staging.save_id, files)
            if final.exists():  # re-running a step after a resume: replace the old copy
                old = final.with_name(f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}")
                os.replace(final, old)
            os.replace(staging.path, final)
        except BaseException:
            self.abort(staging)
            if old is not None and not final.exists():
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.prune(keep)
        return Checkpoint(staging.step, staging.save_id, str(final), dict(files))

    def abort(self, staging: Staging) -> None:
        shutil.rmtree(staging.path, ignore_errors=True)

    def list_complete(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first. A pre-JSON marker is trusted as before (no sizes)."""
        found = []
        for d in sorted(Path(self.checkpoints).glob(f"{STEP_PREFIX}*")):
            marker = self.read_marker(str(d)) if d.is_dir() else None
            if marker is None:
                continue
            files = {k: int(v) for k, v in marker.get("files", {}).items()}
            if marker and not self._matches(files, _local_sizes(str(d))):
                continue
            if not marker:
                files = {k: v for k, v in _local_sizes(str(d)).items() if k != MARKER}
            found.append(Checkpoint(step_of(d.name), marker.get("save_id", ""), str(d), files))
        return found

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; remove temporary directories."""
        _check_keep(keep)
        for ckpt in self.list_complete()[:-keep]:
            shutil.rmtree(ckpt.path, ignore_errors=True)
        for tmp in Path(self.checkpoints).glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch(self, ckpt: Checkpoint, local_dir: str | Path | None = None) -> Path:
        """A local directory holding ``ckpt``: here, the checkpoint itself (no copy)."""
        return Path(ckpt.path)

