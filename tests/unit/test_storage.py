"""Checkpoint stores (ray_rlhf/checkpoint/) on the local disk, in seconds, no network.

Two stores are exercised: :class:`LocalStore` (tmp dir + rename, the default) and
:class:`ObjectStore` over :class:`pyarrow.fs.LocalFileSystem` -- the object-store protocol (files
under a per-save prefix, marker last, no rename) run on a local directory, so its logic is tested
here and only the S3 wire behaviour is left to tests/integration/test_storage_s3.py.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ray_rlhf import checkpoint
from ray_rlhf.errors import UserError

PART = {"policy/config.json": b'{"vocab_size": 512}', "policy/model.safetensors": b"w" * 3000,
        "value_head.safetensors": b"v" * 40, "optimizer.pt": b"o" * 700, "learner.json": b'{"version": 1}'}
"""The learner's part in miniature: relative path -> bytes."""


def write_learner(d: Path, part: dict[str, bytes] = PART) -> None:
    for rel, data in part.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)


def save(store, step: int, keep: int = 5, tag: bytes = b"") -> checkpoint.Checkpoint:
    """One checkpoint: the learner's part (``tag`` appended to the policy) plus driver.json."""
    part = {**PART, "policy/model.safetensors": PART["policy/model.safetensors"] + tag}
    driver = json.dumps({"step": step}).encode()
    return store.save(step, lambda st: store.write_part(st, lambda d: write_learner(d, part)),
                      {"driver.json": driver}, keep=keep)


def steps(store) -> list[int]:
    return [c.step for c in store.list_complete()]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(params=["local", "object"])
def store(request, tmp_path):
    if request.param == "local":
        return checkpoint.open_store(tmp_path / "run")
    root = str(tmp_path / "run")
    return checkpoint.ObjectStore(pafs.LocalFileSystem(), root, root)


# ---- opening ---------------------------------------------------------------------------------------


def test_open_store_local_paths_and_file_uris(tmp_path):
    for where in (tmp_path, str(tmp_path), f"file://{tmp_path}", "runs/relative"):
        s = checkpoint.open_store(where)
        assert isinstance(s, checkpoint.LocalStore)
        assert s.root == os.path.abspath(str(where).removeprefix("file://"))


def test_open_store_s3_with_endpoint_needs_no_network():
    s = checkpoint.open_store("s3://bkt/runs/a?endpoint_override=127.0.0.1:9&scheme=http&region=eu-west-1")
    assert isinstance(s, checkpoint.ObjectStore) and isinstance(s.fs, pafs.S3FileSystem)
    assert s.root == "bkt/runs/a" and s.checkpoints == "bkt/runs/a/checkpoints"
    assert s.fs.region == "eu-west-1"


@pytest.mark.parametrize("uri, message", [
    ("nosuchscheme://x/y", r"unsupported scheme nosuchscheme://.*use a local path, s3://"),
    ("s3://bkt/p?access_key=a&endpoint_override=h:1", r"unknown parameter access_key \(known: region"),
    ("s3:///p?endpoint_override=h:1", r"no bucket"),
])
def test_open_store_bad_uri_is_one_line_user_error(uri, message):
    with pytest.raises(UserError, match=message) as e:
        checkpoint.open_store(uri)
    assert "\n" not in str(e.value)


def test_check_writable_local_fails_early_with_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="cannot write checkpoints to .*file/checkpoints: .*set output_dir") as e:
        checkpoint.open_store(tmp_path / "file").check_writable()
    assert "\n" not in str(e.value)
    checkpoint.open_store(tmp_path / "ok").check_writable()
    assert list((tmp_path / "ok" / "checkpoints").iterdir()) == []  # the probe is gone


@pytest.mark.parametrize("error, cause", [
    ("When initiating multiple part upload for key 'x' in bucket 'nobkt': AWS Error NO_SUCH_BUCKET during "
     "CreateMultipartUpload operation: The specified bucket does not exist (Request ID: abc)", "bucket does not exist"),
    ("Bucket 'nobkt' not found", "bucket does not exist"),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server",
     "endpoint is unreachable"),
    ("AWS Error INVALID_ACCESS_KEY_ID during PutObject operation: The AWS Access Key Id you provided does not exist",
     "access was refused; give the run credentials"),
    ("AWS Error ACCESS_DENIED during PutObject operation: Access Denied", "access was refused"),
])
def test_explain_error_names_the_cause_and_the_fix_in_one_line(error, cause):
    msg = str(checkpoint.explain_error(OSError(error + "\nsecond line"), "s3://nobkt/run"))
    assert msg.startswith("cannot store checkpoints at s3://nobkt/run: ") and cause in msg
    assert "\n" not in msg and "second line" not in msg and "Request ID" not in msg


def test_explain_error_unknown_s3_failure_hints_at_missing_credentials(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    msg = str(checkpoint.explain_error(OSError("AWS Error INTERNAL_FAILURE during PutObject operation: "), "s3://b/r"))
    assert "no AWS credentials found" in msg


# ---- commit: atomic, marker last -------------------------------------------------------------------


def test_save_commits_a_checkpoint_whose_marker_lists_every_file_with_its_size(store):
    ckpt = save(store, 10)
    assert steps(store) == [10] and store.list_complete() == [ckpt]
    marker = json.loads(Path(ckpt.path, checkpoint.MARKER).read_text())
    expected = {rel: len(data) for rel, data in PART.items()} | {"driver.json": len(b'{"step": 10}')}
    assert marker == {"format": 1, "step": 10, "save_id": ckpt.save_id, "files": expected}
    assert ckpt.files == expected
    assert sorted(tree(Path(ckpt.path))) == sorted([*expected, checkpoint.MARKER])
    assert store.read_bytes(ckpt, "driver.json") == b'{"step": 10}'


def test_local_layout_is_unchanged(tmp_path):
    store = checkpoint.open_store(tmp_path)
    ckpt = save(store, 7)
    assert ckpt.path == str(tmp_path / "checkpoints" / "step_000007")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000007"]  # no .tmp left
    assert store.fetch(ckpt, tmp_path / "unused") == Path(ckpt.path)  # local: no copy


def test_object_layout_is_one_sub_prefix_per_save(tmp_path):
    store = checkpoint.ObjectStore(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    ckpt = save(store, 7)
    assert ckpt.save_id.startswith("0001-")
    assert ckpt.path == f"{tmp_path}/checkpoints/step_000007/{ckpt.save_id}"


def test_marker_is_written_after_every_listed_file(store, monkeypatch):
    seen = []
    real = store.write_marker

    def spy(path, step, save_id, files):
        on_disk = {rel: (Path(path) / rel).stat().st_size for rel in files if (Path(path) / rel).is_file()}
        seen.append((on_disk == files, steps(store)))
        real(path, step, save_id, files)

    monkeypatch.setattr(store, "write_marker", spy)
    save(store, 3)
    assert seen == [(True, [])]  # every file was in place, and nothing was complete yet


def test_nothing_is_complete_while_the_learner_writes(store):
    during = []

    def learner(st):
        def write(d):
            write_learner(d)
            during.append(steps(store))
        return store.write_part(st, write)

    store.save(4, learner, {"driver.json": b"{}"}, keep=2)
    assert during == [[]] and steps(store) == [4]


# ---- torn writes -----------------------------------------------------------------------------------


def test_failing_learner_leaves_nothing(store):
    def half_then_fail(d: Path) -> None:
        (d / "learner.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.save(3, lambda st: store.write_part(st, half_then_fail), {"driver.json": b"{}"}, keep=2)
    assert steps(store) == []
    assert tree(Path(store.checkpoints)) == []  # the staging area was removed


def test_object_upload_failing_after_k_files_leaves_nothing_complete(tmp_path, monkeypatch):
    store = checkpoint.ObjectStore(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    real, copied = checkpoint.store._copy_file, []

    def copy_then_fail(*args):
        if len(copied) == 2:
            raise OSError("connection reset by peer")
        real(*args)
        copied.append(args[3])

    monkeypatch.setattr(checkpoint.store, "_copy_file", copy_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        store.save(5, lambda st: store.write_part(st, write_learner, workers=1), {"driver.json": b"{}"}, keep=2)
    assert len(copied) == 2 and steps(store) == []


@pytest.mark.parametrize("stop_after", [0, 2, len(PART)])
def test_save_killed_before_its_marker_is_never_complete_and_is_pruned_later(store, stop_after):
    """A writer SIGKILLed mid-save runs no cleanup: some files are there, the marker is not."""
    staging = store.begin(8)
    for rel in list(PART)[:stop_after]:
        dst = Path(staging.path, rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(PART[rel])
    assert steps(store) == []
    save(store, 9, keep=2)
    assert steps(store) == [9]
    assert all(p.startswith("step_000009") for p in tree(Path(store.checkpoints)))  # the torn save is gone


@pytest.mark.parametrize("damage", ["delete", "truncate", "marker"])
def test_checkpoint_whose_files_disagree_with_its_marker_is_not_complete(store, damage):
    ckpt = save(store, 6)
    target = Path(ckpt.path, "policy/model.safetensors")
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    else:
        Path(ckpt.path, checkpoint.MARKER).write_text('{"format": 1, "st')  # a torn marker
    assert steps(store) == []


def test_local_pre_json_marker_is_still_complete(tmp_path):
    """Checkpoints written before this module carry the step number alone in COMPLETE."""
    d = tmp_path / "checkpoints" / "step_000002"
    write_learner(d)
    (d / checkpoint.MARKER).write_text("2")
    (ckpt,) = checkpoint.open_store(tmp_path).list_complete()
    assert ckpt.step == 2 and ckpt.files == {rel: len(b) for rel, b in PART.items()}


# ---- prune and re-save -----------------------------------------------------------------------------


def test_prune_keeps_the_newest_m(store):
    for step in range(1, 6):
        save(store, step, keep=2)
    assert steps(store) == [4, 5]
    assert {p.split("/")[0] for p in tree(Path(store.checkpoints))} == {"step_000004", "step_000005"}
    with pytest.raises(ValueError, match="at least 1"):
        store.prune(0)


def test_resave_of_a_step_replaces_the_old_copy(store):
    save(store, 4, tag=b"old")
    new = save(store, 4, tag=b"new")
    (ckpt,) = store.list_complete()
    assert ckpt == new and store.read_bytes(ckpt, "policy/model.safetensors").endswith(b"new")
    assert len(tree(Path(store.checkpoints))) == len(new.files) + 1  # one copy (and its marker) on disk


def test_failing_resave_keeps_the_old_copy(store):
    old = save(store, 4, tag=b"old")

    def fail(st):
        store.write_part(st, write_learner)
        raise RuntimeError("learner died")

    with pytest.raises(RuntimeError):
        store.save(4, fail, {}, keep=2)
    assert store.list_complete() == [old]
    assert store.read_bytes(old, "policy/model.safetensors").endswith(b"old")


def test_object_crash_between_new_marker_and_cleanup_resumes_from_the_new_copy(tmp_path):
    """Two complete saves of one step (the writer died before deleting the older one): readers take
    the later ``save_id``, whatever the clocks, and never a mix; the next prune removes the older."""
    store = checkpoint.ObjectStore(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))
    old = save(store, 4, tag=b"old")
    staging = store.begin(4)
    files = store.write_part(staging, lambda d: write_learner(d, {**PART, "policy/model.safetensors": b"n" * 5}))
    store.write_marker(staging.path, 4, staging.save_id, files)  # ...and the process dies here
    (ckpt,) = store.list_complete()
    assert ckpt.save_id > old.save_id and ckpt.save_id.startswith("0002-")
    assert store.read_bytes(ckpt, "policy/model.safetensors") == b"n" * 5
    assert "driver.json" not in ckpt.files  # this save's own file list, not the older save's
    store.prune(2)
    assert not Path(old.path).exists() and store.list_complete() == [ckpt]


# ---- fetching for resume on another node -----------------------------------------------------------


def test_object_fetch_downloads_the_listed_files_with_their_bytes(tmp_path):
    store = checkpoint.ObjectStore(pafs.LocalFileSystem(), str(tmp_path / "remote"), str(tmp_path / "remote"))
    save(store, 2)
    other_node = pickle.loads(pickle.dumps(store))  # what Ray would ship to another process
    ckpt = other_node.latest()
    local = other_node.fetch(ckpt, tmp_path / "local")
    assert sorted(tree(local)) == sorted(ckpt.files)
    for rel, data in PART.items():
        assert (local / rel).read_bytes() == data


def test_object_fetch_notices_a_file_changed_under_it(tmp_path):
    store = checkpoint.ObjectStore(pafs.LocalFileSystem(), str(tmp_path / "remote"), str(tmp_path / "remote"))
    ckpt = save(store, 2)
    Path(ckpt.path, "optimizer.pt").write_bytes(b"short")
    with pytest.raises(OSError, match="optimizer.pt .*wrong size"):
        store.fetch(ckpt, tmp_path / "local")


def test_commit_refuses_files_that_were_not_written_as_reported(store):
    staging = store.begin(3)
    files = store.write_part(staging, write_learner)
    with pytest.raises(OSError, match="optimizer.pt not written as reported"):
        store.commit(staging, {**files, "optimizer.pt": files["optimizer.pt"] + 1}, keep=2)
    assert steps(store) == [] and tree(Path(store.checkpoints)) == []


def test_object_prune_failing_after_the_marker_keeps_the_checkpoint(tmp_path, monkeypatch, caplog):
    store = checkpoint.ObjectStore(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path))

    def broken_prune(keep):
        raise OSError("AWS Error SLOW_DOWN during DeleteObjects operation")

    monkeypatch.setattr(store, "prune", broken_prune)
    ckpt = save(store, 5)
    assert store.list_complete() == [ckpt]
    assert "committed, but pruning old ones failed: AWS Error SLOW_DOWN" in caplog.text
