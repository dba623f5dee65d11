"""What every checkpoint store shares: staging, the checkpoint record, the store base class (the
atomic save, the marker, byte I/O), error explanation and the file-copy helpers (see
:mod:`ray_rlhf.checkpoint`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ray_rlhf.checkpoint.layout import CHECKPOINTS, FORMAT, MARKER
from ray_rlhf.errors import UserError

S3_PARAMS = ("region", "endpoint_override", "scheme")
"""Query parameters an ``s3://`` URI may carry."""


@dataclass(frozen=True)
class Staging:
    """A checkpoint being written. Nothing under ``path`` is trusted before ``commit``."""

    step: int
    save_id: str
    path: str
    """Local directory (:class:`LocalStore`) or object prefix, no trailing slash, to write under."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint, as its marker describes it."""

    step: int
    save_id: str
    path: str
    """Directory or object prefix holding the files."""
    files: dict[str, int]
    """Relative path (``/``-separated) -> size in bytes, the marker excluded."""


class _Store:
    """What both stores share: byte I/O, tree copies, markers and deletes over one pyarrow FS."""

    def __init__(self, fs: pafs.FileSystem, root: str, uri: str, probe_fs: pafs.FileSystem | None = None):
        self.fs, self.root, self.uri = fs, root.rstrip("/"), uri
        self.probe_fs = probe_fs or fs
        """Same place, fewer retries: :meth:`check_writable` fails fast on a wrong endpoint."""

    @property
    def checkpoints(self) -> str:
        return f"{self.root}/{CHECKPOINTS}"

    def save(self, step: int, write_parts: Callable[[Staging], dict[str, int]], files: dict[str, bytes],
             keep: int) -> Checkpoint:
        """The whole protocol for one step: begin, ``write_parts(staging)`` (returns the sizes it
        wrote, e.g. the learner's :meth:`write_part`), ``files`` written by name, commit, prune.
        On a failure before the commit the staging area is removed and the error re-raised."""
        staging = self.begin(step)
        try:
            written = dict(write_parts(staging))
            for name, data in files.items():
                written.update(self.write_bytes(staging, name, data))
        except BaseException:
            self.abort(staging)
            raise
        return self.commit(staging, written, keep)

    def write_bytes(self, staging: Staging, name: str, data: bytes) -> dict[str, int]:
        with _open_output(self.fs, f"{staging.path}/{name}") as out:
            out.write(data)
        return {name: len(data)}

    def read_bytes(self, ckpt: Checkpoint, name: str) -> bytes:
        with self.fs.open_input_stream(f"{ckpt.path}/{name}") as f:
            return f.read()

    def latest(self) -> Checkpoint | None:
        found = self.list_complete()
        return found[-1] if found else None

    def upload_dir(self, local_dir: str | Path, prefix: str, workers: int = 8) -> dict[str, int]:
        """Copy every file under ``local_dir`` to ``prefix``; returns ``{relative path: size}``."""
        local_dir = os.path.abspath(local_dir)
        sizes = _local_sizes(local_dir)
        _parallel(workers, [(pafs.LocalFileSystem(), f"{local_dir}/{rel}", self.fs, f"{prefix}/{rel}")
                            for rel in sizes])
        return sizes

    def download_dir(self, prefix: str, local_dir: str | Path, files: dict[str, int] | None = None,
                     workers: int = 8) -> Path:
        """Copy ``files`` (default: all) under ``prefix`` into ``local_dir``; sizes are checked."""
        files = self._sizes(prefix) if files is None else files
        local_dir = os.path.abspath(local_dir)
        _parallel(workers, [(self.fs, f"{prefix}/{rel}", pafs.LocalFileSystem(), f"{local_dir}/{rel}")
                            for rel in files])
        bad = [rel for rel, size in _local_sizes(local_dir).items() if rel in files and size != files[rel]]
        if bad:
            raise OSError(f"downloaded {', '.join(bad)} from {prefix} with the wrong size (deleted meanwhile?)")
        return Path(local_dir)

    def write_marker(self, path: str, step: int, save_id: str, files: dict[str, int]) -> None:
        marker = {"format": FORMAT, "step": step, "save_id": save_id, "files": dict(sorted(files.items()))}
        with _open_output(self.fs, f"{path}/{MARKER}") as out:
            out.write(json.dumps(marker, indent=1).encode())

    def read_marker(self, path: str) -> dict | None:
        """The marker under ``path``: None if absent or unreadable, ``{}`` for a pre-JSON one (the
        step number alone, as written before this module)."""
        try:
            with self.fs.open_input_stream(f"{path}/{MARKER}") as f:
                raw = f.read()
        except OSError:
            return None
        if raw.strip().isdigit():
            return {}
        try:
            marker = json.loads(raw)
        except ValueError:
            return None
        return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None

    def delete_prefix(self, path: str) -> None:
        """Delete ``path``'s marker first, then everything under it (absent: nothing to do)."""
        try:
            self.fs.delete_file(f"{path}/{MARKER}")
        except OSError:
            pass
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)

    def _sizes(self, prefix: str) -> dict[str, int]:
        infos = self.fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        n = len(prefix) + 1
        return {i.path[n:]: i.size for i in infos if i.type == pafs.FileType.File}

    @staticmethod
    def _matches(files: dict[str, int], have: dict[str, int]) -> bool:
        return all(have.get(rel) == int(size) for rel, size in files.items())

    def _check_written(self, staging: Staging, files: dict[str, int]) -> None:
        have = self._sizes(staging.path)
        bad = sorted(rel for rel, size in files.items() if have.get(rel) != size)
        if MARKER in files or bad:
            raise OSError(f"checkpoint {staging.path}: {', '.join(bad) or MARKER} not written as reported")



_CAUSES = (
    (("NO_SUCH_BUCKET", "NoSuchBucket", "specified bucket does not exist", "bucket does not exist"),
     "the bucket does not exist; create it or fix the bucket name"),
    (("NETWORK_CONNECTION", "curlCode", "Could not connect", "Could not resolve", "Connection refused",
      "timed out", "Timeout"),
     "the storage endpoint is unreachable; check endpoint_override / AWS_ENDPOINT_URL and the network"),
    (("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH",
      "SignatureDoesNotMatch", "EXPIRED_TOKEN", "ExpiredToken", "credential", "Forbidden", "Unauthorized",
      "Permission denied", "PERMISSION_DENIED", "Read-only file system"),
     "access was refused; give the run credentials that may write there (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
     "~/.aws/credentials or an instance role; GOOGLE_APPLICATION_CREDENTIALS for gs://)"),
)


def explain_error(e: BaseException, uri: str) -> UserError:
    """A one-line UserError naming ``uri``, the likely cause and the fix, for a storage error."""
    detail = _first_line(e)
    if re.search(r"Bucket '[^']*' not found", detail):
        return UserError(f"cannot store checkpoints at {uri}: {_CAUSES[0][1]} ({detail})")
    for needles, cause in _CAUSES:
        if any(n in detail for n in needles):
            return UserError(f"cannot store checkpoints at {uri}: {cause} ({detail})")
    hint = ""
    if uri.startswith("s3://") and not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                                        or Path("~/.aws/credentials").expanduser().exists()):
        hint = "no AWS credentials found in the environment or ~/.aws; "
    return UserError(f"cannot store checkpoints at {uri}: {detail}; {hint}check the location, credentials and "
                     "network, or set output_dir to a local directory")



def _check_keep(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (got {keep})")


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    return text if len(text) <= 240 else text[:237] + "..."


def _local_sizes(directory: str) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, directory).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def _open_output(fs: pafs.FileSystem, path: str):
    """An output stream; on a local disk the parent directories are made first (object stores
    have none)."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open_output_stream(path)


def _copy_file(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str, chunk: int = 8 << 20) -> None:
    with src_fs.open_input_stream(src) as f, _open_output(dst_fs, dst) as out:
        while block := f.read(chunk):
            out.write(block)


def _parallel(workers: int, copies: list[tuple]) -> None:
    """Run the copies on ``workers`` threads; the first failure cancels the rest and is raised."""
    with ThreadPoolExecutor(max(1, min(workers, len(copies) or 1))) as pool:
        futures = [pool.submit(_copy_file, *c) for c in copies]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
