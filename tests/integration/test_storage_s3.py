"""Checkpoints in S3 (ray_rlhf/checkpoint/) against a real S3 wire protocol: moto's server mode.

The fixture starts ``python -m moto.server`` on 127.0.0.1 (a free port, chosen by the server) and
stops it afterwards; nothing needs to be running beforehand. Needs ``moto[server]`` (dev extra).
Every test works under its own prefix of one bucket. Covered: a commit round trip (a few files, one
of 6 MB) read back from a second store object as another node would; a re-save SIGKILLed mid-upload
(the old copy stays the one listed, byte for byte, and the debris is pruned later); prune; the
endpoint taken from ``AWS_ENDPOINT_URL``; one-line errors for a wrong endpoint, a missing bucket and
refused credentials.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ray_rlhf import checkpoint
from ray_rlhf.errors import UserError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BUCKET = "ckpts"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
"""Dummy credentials moto accepts; no instance-metadata lookups (slow off EC2)."""


@contextmanager
def moto_server(log: Path, **env: str):
    """A moto S3 server on 127.0.0.1; yields ``host:port``. Killed on exit."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'moto[server]', dev extra)")
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{m.group(1)}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module", autouse=True)
def aws_env():
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        for var, value in AWS_ENV.items():
            mp.setenv(var, value)
        yield


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as ep:
        pafs.S3FileSystem(endpoint_override=ep, scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
        yield ep


@pytest.fixture
def uri(endpoint):
    """A fresh run directory in the bucket."""
    return f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}?endpoint_override={endpoint}&scheme=http"


def make_part(d: Path, tag: bytes = b"") -> dict[str, bytes]:
    """The learner's part: small files and a 6 MB "model"; returns relative path -> bytes."""
    part = {"policy/config.json": b'{"vocab_size": 512}', "policy/model.safetensors": os.urandom(6 << 20) + tag,
            "value_head.safetensors": b"v" * 40, "optimizer.pt": os.urandom(300_000), "learner.json": b"{}"}
    for rel, data in part.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return part


def save(store, step: int, keep: int = 3, tag: bytes = b"") -> tuple[checkpoint.Checkpoint, dict[str, bytes]]:
    written: dict[str, bytes] = {}
    ckpt = store.save(step, lambda st: store.write_part(st, lambda d: written.update(make_part(d, tag))),
                      {"driver.json": b'{"step": %d}' % step}, keep=keep)
    return ckpt, {**written, "driver.json": b'{"step": %d}' % step}


def objects(store) -> list[str]:
    infos = store.fs.get_file_info(pafs.FileSelector(store.checkpoints, recursive=True, allow_not_found=True))
    return sorted(i.path[len(store.checkpoints) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_commit_list_and_download_from_another_node(uri, tmp_path):
    store = checkpoint.open_store(uri)
    store.check_writable()
    ckpt, written = save(store, 10)
    assert [c.step for c in store.list_complete()] == [10]
    assert objects(store) == sorted(f"step_000010/{ckpt.save_id}/{rel}" for rel in [*written, checkpoint.MARKER])

    other = checkpoint.open_store(uri)  # a driver on another node: nothing shared but the URI
    (found,) = other.list_complete()
    assert found == ckpt and found.files == {rel: len(b) for rel, b in written.items()}
    local = other.fetch(found, tmp_path / "resume")
    for rel, data in written.items():
        assert (local / rel).read_bytes() == data, rel
    assert other.read_bytes(found, "driver.json") == b'{"step": 10}'


UPLOADER = textwrap.dedent("""
    import sys, time
    from ray_rlhf import checkpoint
    real = checkpoint.store._copy_file
    def slow(*args):  # a slow link: the test kills the process between two files
        real(*args)
        print("copied", args[3], flush=True)
        time.sleep(0.5)
    checkpoint.store._copy_file = slow
    store = checkpoint.open_store(sys.argv[1])
    files = {"policy/model.safetensors": b"N" * (3 << 20), "optimizer.pt": b"N" * 1000, "learner.json": b"{}",
             "policy/config.json": b"{}", "value_head.safetensors": b"N" * 40}
    def write(d):
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
    store.save(int(sys.argv[2]), lambda st: store.write_part(st, write, workers=1), {"driver.json": b"{}"}, keep=2)
    print("committed", flush=True)
""")


def test_resave_killed_mid_upload_leaves_the_old_copy_listed_and_is_pruned_later(uri, tmp_path):
    store = checkpoint.open_store(uri)
    old, written = save(store, 10)
    proc = subprocess.Popen([sys.executable, "-c", UPLOADER, uri, "10"], stdout=subprocess.PIPE, text=True)
    try:
        copied = [proc.stdout.readline() for _ in range(2)]  # two files are in the bucket...
        proc.send_signal(signal.SIGKILL)  # ...when the node vanishes
    finally:
        proc.kill()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == -signal.SIGKILL and all(line.startswith("copied") for line in copied)
    assert "committed" not in out

    torn = [o for o in objects(store) if not o.startswith(f"step_000010/{old.save_id}/")]
    assert len(torn) == 2 and all(o.startswith("step_000010/0002-") for o in torn)
    assert store.list_complete() == [old]  # never the torn re-save, never a mix
    local = store.fetch(old, tmp_path / "resume")
    assert all((local / rel).read_bytes() == data for rel, data in written.items())

    new, _ = save(store, 12, keep=2)
    assert store.list_complete() == [old, new]
    assert not [o for o in objects(store) if o.startswith("step_000010/0002-")]  # debris pruned


def test_prune_keeps_the_newest_m(uri):
    store = checkpoint.open_store(uri)
    for step in (2, 4, 6, 8):
        save(store, step, keep=2)
    assert [c.step for c in store.list_complete()] == [6, 8]
    assert {o.split("/")[0] for o in objects(store)} == {"step_000006", "step_000008"}


def test_endpoint_from_aws_endpoint_url(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")
    store = checkpoint.open_store(f"s3://{BUCKET}/env-{uuid.uuid4().hex[:8]}")
    store.check_writable()
    store.save(1, lambda st: {}, {"driver.json": b"{}"}, keep=1)
    assert [c.step for c in store.list_complete()] == [1]


def test_wrong_endpoint_is_a_quick_one_line_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = checkpoint.open_store(f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{port}&scheme=http")
    t0 = time.monotonic()
    with pytest.raises(UserError, match=f"cannot store checkpoints at s3://{BUCKET}/run.*endpoint is unreachable") as e:
        store.check_writable()
    assert time.monotonic() - t0 < 10
    assert "\n" not in str(e.value)


def test_missing_bucket_is_a_one_line_error(endpoint):
    store = checkpoint.open_store(f"s3://no-such-bucket/run?endpoint_override={endpoint}&scheme=http")
    with pytest.raises(UserError, match="no-such-bucket.*the bucket does not exist; create it") as e:
        store.check_writable()
    assert "\n" not in str(e.value)


def test_refused_credentials_are_a_one_line_error(tmp_path):
    # INITIAL_NO_AUTH_ACTION_COUNT=0: this moto checks every request's credentials (ours are unknown).
    with moto_server(tmp_path / "moto-auth.log", INITIAL_NO_AUTH_ACTION_COUNT="0") as ep:
        store = checkpoint.open_store(f"s3://{BUCKET}/run?endpoint_override={ep}&scheme=http")
        with pytest.raises(UserError, match="access was refused; give the run credentials") as e:
            store.check_writable()
    assert "\n" not in str(e.value)


def test_a_run_checkpoints_to_s3_and_resumes_from_it_on_another_driver(uri, tmp_path, models_dir, uninterrupted):
    """``checkpoint.location=s3://...``: the learner writes its part straight into the bucket; a run
    stopped after step 2 is resumed by a driver with an empty output_dir of its own (nothing local
    carries over) and ends equal to the uninterrupted run (the session's shared one, checkpointed
    locally)."""
    import math

    from ray_rlhf.models.output_head import read_hf_state
    from tests.integration.runs import run_tiny

    whole_dir, whole_rows = uninterrupted
    s3 = (f"checkpoint.location={uri}", "logging.ray_metrics=false")
    run_tiny(tmp_path / "first", models_dir, *s3, "faults.stop=[{step: 2}]")
    store = checkpoint.open_store(uri)
    assert [c.step for c in store.list_complete()] == [2]
    rows = run_tiny(tmp_path / "elsewhere", models_dir, *s3)  # resumes from the bucket at step 2
    whole, elsewhere = {r["step"]: r for r in whole_rows}, {r["step"]: r for r in rows}
    assert sorted(elsewhere) == [3, 4]
    for step in (3, 4):
        for key in ("reward/mean", "ppo/policy_loss", "ppo/kl_ref", "ppo/grad_norm"):
            assert math.isclose(elsewhere[step][key], whole[step][key], rel_tol=1e-4, abs_tol=1e-6), (step, key)
    final = store.latest()
    assert final.step == 4
    local = store.fetch(final, tmp_path / "fetched")
    want = read_hf_state(whole_dir / "checkpoints" / "step_000004" / "policy")
    got = read_hf_state(local / "policy")
    assert set(got) == set(want)
    for name, t in want.items():  # bit-equal when measured; the resume tests' tolerance
        assert (got[name] - t).abs().max() <= 1e-5 * max(1.0, float(t.abs().max())), name
