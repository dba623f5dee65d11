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

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from ray_rlhf.errors import UserError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT = 1
S3_PARAMS = ("region", "endpoint_override", "scheme")
"""Query parameters an ``s3://`` URI may carry."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


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
        return f"{self.root}/checkpoints"

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
        for d in sorted(Path(self.checkpoints).glob("step_*")):
            marker = self.read_marker(str(d)) if d.is_dir() else None
            if marker is None:
                continue
            files = {k: int(v) for k, v in marker.get("files", {}).items()}
            if marker and not self._matches(files, _local_sizes(str(d))):
                continue
            if not marker:
                files = {k: v for k, v in _local_sizes(str(d)).items() if k != MARKER}
            found.append(Checkpoint(int(d.name.split("_")[1]), marker.get("save_id", ""), str(d), files))
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
            if len(parts) >= 3 and re.fullmatch(r"step_\d+", parts[0]):
                seen.add((parts[0], parts[1]))
        for step_name, save_id in sorted(seen):
            has_marker = f"{step_name}/{save_id}/{MARKER}" in sizes
            marker = self.read_marker(f"{self.checkpoints}/{step_name}/{save_id}") if has_marker else None
            steps.setdefault(int(step_name.split("_")[1]), []).append((save_id, marker))
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
            if info.type == pafs.FileType.Directory and name.startswith("step_") and name not in kept_steps:
                self.fs.delete_dir(info.path)

    def fetch(self, ckpt: Checkpoint, local_dir: str | Path, workers: int = 8) -> Path:
        """Download ``ckpt`` (its listed files, sizes checked) into ``local_dir``; returns it."""
        return self.download_dir(ckpt.path, local_dir, ckpt.files, workers)


CheckpointStore = LocalStore | ObjectStore


def open_store(uri_or_path: str | Path) -> CheckpointStore:
    """The store for ``output_dir``: a local path or ``file://`` URI, ``s3://``, ``gs://``, ...

    No network I/O except an S3 region lookup when neither a region nor an endpoint is given.
    One-line :class:`UserError` for an unknown scheme or a bad URI; call ``check_writable()``
    next for the errors only a request shows (bucket, credentials, endpoint).
    """
    text = str(uri_or_path)
    parts = urlsplit(text)
    if isinstance(uri_or_path, Path) or not parts.scheme or len(parts.scheme) == 1:
        return LocalStore(text)
    if parts.scheme == "file":
        return LocalStore(parts.path)
    try:
        if parts.scheme == "s3":
            return _open_s3(text, parts)
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except Exception as e:  # pyarrow's own schemes first; then fsspec's
            if "Unrecognized filesystem type" not in str(e):
                raise
            fs, root = _open_fsspec(text, parts)
        probe = fs
        if parts.scheme in ("gs", "gcs") and "retry_limit_seconds" not in parts.query:
            probe, _ = pafs.FileSystem.from_uri(f"{text}{'&' if parts.query else '?'}retry_limit_seconds=5")
        return ObjectStore(fs, root, text, probe)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - every store failure becomes one line
        raise explain_error(e, text) from None


def _open_s3(uri: str, parts) -> ObjectStore:
    query = dict(parse_qsl(parts.query))
    unknown = sorted(set(query) - set(S3_PARAMS))
    if unknown or not parts.netloc:
        raise UserError(f"bad S3 URI {uri}: " + (f"unknown parameter {', '.join(unknown)} (known: "
                        f"{', '.join(S3_PARAMS)})" if unknown else "no bucket") + "; use s3://bucket/prefix")
    opts: dict = {k: query[k] for k in S3_PARAMS if k in query}
    # As FileSystem.from_uri does: the endpoint from the environment (the S3FileSystem constructor
    # does not read it), and, on AWS itself, the bucket's own region unless the URI names one.
    opts.setdefault("endpoint_override", os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if not opts.get("region") and not opts["endpoint_override"]:
        opts["region"] = pafs.resolve_s3_region(parts.netloc)
    fs = pafs.S3FileSystem(**{k: v for k, v in opts.items() if v})
    probe = pafs.S3FileSystem(**{k: v for k, v in opts.items() if v}, connect_timeout=5,
                              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    return ObjectStore(fs, f"{parts.netloc}{parts.path}", uri, probe)


def _open_fsspec(uri: str, parts) -> tuple[pafs.FileSystem, str]:
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot store checkpoints at {uri}: unsupported scheme {parts.scheme}:// ({_first_line(e)}); "
                        "use a local path, s3://, gs:// or an fsspec protocol whose package is installed") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


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
