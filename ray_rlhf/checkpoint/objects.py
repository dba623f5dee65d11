"""Checkpoints in an object store (marker written last; see :mod:`ray_rlhf.checkpoint`)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from ray_rlhf.checkpoint.layout import MARKER, STEP_PREFIX, step_dir_name, step_of
from ray_rlhf.checkpoint.store import (
    Checkpoint,
    Staging,
    _check_keep,
    _first_line,
    _open_output,
    _Store,
    explain_error,
)

log = logging.getLogger(__name__)


class ObjectStore(_Store):
    """Checkpoints in an object store: per-save sub-prefix, marker written last (module docstring)."""

    def check_writable(self) -> None:
        """Write and delete a probe object: a one-line UserError, before any expensive work, for a
        missing bucket, refused credentials or an unreachable endpoint."""
        probe = f"{self.checkpoints}/.probe-{uuid.uuid4().hex}"
        try:
            with _open_output(self.probe_fs, probe) as out:
                out.write(b"ok")
            self.probe_fs.delete_file(probe)
        except (OSError, ValueError) as e:
            raise explain_error(e, self.uri) from None

    def begin(self, step: int) -> Staging:
        step_path = f"{self.checkpoints}/{step_dir_name(step)}"
        infos = self.fs.get_file_info(pafs.FileSelector(step_path, allow_not_found=True))
        seqs = [int(m.group(1)) for i in infos if (m := re.match(r"(\d+)-", os.path.basename(i.path)))]
        save_id = f"{max(seqs, default=0) + 1:04d}-{uuid.uuid4().hex[:8]}"
        return Staging(step, save_id, f"{step_path}/{save_id}")

    def write_part(self, staging: Staging, write: Callable[[Path], None], tmp_dir: str | None = None,
                   workers: int = 8) -> dict[str, int]:
        """``write(directory)`` writes into a local temporary directory, which is then uploaded
        from this node; returns the sizes."""
        with tempfile.TemporaryDirectory(prefix="ray-rlhf-ckpt-", dir=tmp_dir) as tmp:
            write(Path(tmp))
            return self.upload_dir(tmp, staging.path, workers)

    def commit(self, staging: Staging, files: dict[str, int], keep: int) -> Checkpoint:
        """Check the files, write the marker (the commit point), then prune. A failed prune is
        only logged: the checkpoint is complete, and the next prune retries."""
        try:
            self._check_written(staging, files)
            self.write_marker(staging.path, staging.step, staging.save_id, files)
        except BaseException:
            self.abort(staging)
            raise
        try:
            self.prune(keep)
        except OSError as e:
            log.warning("checkpoint %s committed, but pruning old ones failed: %s", staging.path, _first_line(e))
        return Checkpoint(staging.step, staging.save_id, staging.path, dict(files))

    def abort(self, staging: Staging) -> None:
        try:
            self.delete_prefix(staging.path)
        except OSError:
            pass  # the next prune removes it

    def _saves(self) -> tuple[dict[str, int], dict[int, list[tuple[str, dict | None]]]]:
        """One listing: sizes of every object, and per step its saves ``(save_id, marker or None)``."""
        sizes = self._sizes(self.checkpoints)
        steps: dict[int, list[tuple[str, dict | None]]] = {}
        seen: set[tuple[str, str]] = set()
        for rel in sizes:
            parts = rel.split("/")
            if len(parts) >= 3 and re.fullmatch(rf"{STEP_PREFIX}\d+", parts[0]):
                seen.add((parts[0], parts[1]))
        for step_name, save_id in sorted(seen):
            has_marker = f"{step_name}/{save_id}/{MARKER}" in sizes
            marker = self.read_marker(f"{self.checkpoints}/{step_name}/{save_id}") if has_marker else None
            steps.setdefault(step_of(step_name), []).append((save_id, marker))
        return sizes, steps

    def _complete(self, sizes: dict[str, int], step: int, save_id: str, marker: dict | None) -> Checkpoint | None:
        if not marker or marker.get("save_id") != save_id or marker.get("step") != step:
            return None
        prefix = f"{step_dir_name(step)}/{save_id}/"
        files = {k: int(v) for k, v in marker["files"].items()}
        if not self._matches(files, {k[len(prefix):]: v for k, v in sizes.items() if k.startswith(prefix)}):
            return None
        return Checkpoint(step, save_id, f"{self.checkpoints}/{prefix[:-1]}", files)

    def list_complete(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first; of several complete saves of a step, the newest."""
        sizes, steps = self._saves()
        found = []
        for step in sorted(steps):
            done = [c for s, m in steps[step] if (c := self._complete(sizes, step, s, m))]
            if done:
                found.append(max(done, key=lambda c: (int(c.save_id.split("-")[0]), c.save_id)))
        return found

    def prune(self, keep: int) -> None:
        """Keep the newest save of the newest ``keep`` complete steps; delete every other save."""
        _check_keep(keep)
        kept = {(c.step, c.save_id) for c in self.list_complete()[-keep:]}
        for step, saves in self._saves()[1].items():
            for save_id, _ in saves:
                if (step, save_id) not in kept:
                    self.delete_prefix(f"{self.checkpoints}/{step_dir_name(step)}/{save_id}")
        kept_steps = {step_dir_name(step) for step, _ in kept}
        for info in self.fs.get_file_info(pafs.FileSelector(self.checkpoints, allow_not_found=True)):
            name = os.path.basename(info.path)  # emptied step "directories" (marker objects on S3)
            if info.type == pafs.FileType.Directory and name.startswith(STEP_PREFIX) and name not in kept_steps:
                self.fs.delete_dir(info.path)

    def fetch(self, ckpt: Checkpoint, local_dir: str | Path, workers: int = 8) -> Path:
        """Download ``ckpt`` (its listed files, sizes checked) into ``local_dir``; returns it."""
        return self.download_dir(ckpt.path, local_dir, ckpt.files, workers)

