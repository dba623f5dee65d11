"""From ``output_dir`` / ``checkpoint.location`` (a path or a URI) to a store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from ray_rlhf.checkpoint.local import LocalStore
from ray_rlhf.checkpoint.objects import ObjectStore
from ray_rlhf.checkpoint.store import S3_PARAMS, _first_line, explain_error
from ray_rlhf.errors import UserError

if TYPE_CHECKING:
    from ray_rlhf.config.schema import RunConfig

CheckpointStore = LocalStore | ObjectStore


def location(cfg: RunConfig) -> str:
    """Where a run's checkpoints are: ``checkpoint.location``, or ``output_dir`` (made absolute);
    checkpoints go under ``<location>/checkpoints``."""
    return cfg.checkpoint.location or os.path.abspath(cfg.output_dir)


def check_writable(output_dir: str | Path) -> None:
    """Fail early (before any expensive work) if checkpoints cannot be written under the local
    directory ``output_dir``."""
    LocalStore(output_dir).check_writable()


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


