"""Checkpoints (ray_rlhf/checkpoint/) in a local directory, through the API a run uses: atomic or
absent, newest M kept, resume resolution, validation of whole vs incomplete/corrupt directories,
and loading that never unpickles. (The stores themselves, local and object: tests/unit/test_storage.py.)

No Ray. The fake learner writes small but well-formed files (real safetensors, a real torch zip);
the last tests use the real :class:`~ray_rlhf.learning.learner.Learner` on the tiny model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ray_rlhf import checkpoint
from ray_rlhf.errors import UserError

POLICY_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "intermediate_size": 128}


def fake_learner(d: Path) -> None:
    """What :meth:`Learner.save_state` writes, in miniature."""
    (d / "policy").mkdir()
    (d / "policy" / "config.json").write_text(json.dumps(POLICY_CONFIG))
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(d / "policy" / "model.safetensors"))
    save_file({"weight": torch.ones(1, 4)}, str(d / "value_head.safetensors"))
    torch.save({"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
               d / "optimizer.pt")
    save_file({"learner": torch.zeros(8, dtype=torch.uint8)}, str(d / "rng.safetensors"))
    (d / "learner.json").write_text(json.dumps({"version": 3, "kl_ctl": {"value": 0.05}}))


def state(step: int) -> dict:
    return {"step": step, "version": step, "data": {"epoch": 0, "position": 4 * step}, "pool_restarts": 0}


def save(out: Path, step: int, keep: int = 5, write=fake_learner) -> Path:
    """A checkpoint as :func:`ray_rlhf.run.state.save` writes one: the learner's part plus driver.json."""
    store = checkpoint.open_store(out)
    files = {"driver.json": json.dumps(state(step), indent=1, sort_keys=True).encode()}
    return Path(store.save(step, lambda staging: store.write_part(staging, write), files, keep=keep).path)


def resume(out: Path, how: str = "auto") -> Path | None:
    """The directory :func:`checkpoint.find_resume` picks in ``out`` (``checkpoint.resume=how``)."""
    found = checkpoint.find_resume(checkpoint.open_store(out), how)
    return None if found is None else Path(found.path)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ---- atomicity ------------------------------------------------------------------------------------


def test_save_writes_a_complete_checkpoint(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_000007"
    marker = json.loads((path / "COMPLETE").read_text())  # the files and their sizes, written last
    assert marker["step"] == 7 and marker["files"]["driver.json"] == (path / "driver.json").stat().st_size
    assert checkpoint.validate(path) == state(7)
    assert names(tmp_path / "checkpoints") == ["step_000007"]  # no temporary directory left


def test_failing_learner_write_leaves_no_step_dir_and_no_tmp_dir(tmp_path):
    def half_then_fail(d: Path) -> None:
        (d / "policy").mkdir()
        (d / "learner.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 3, write=half_then_fail)
    assert names(tmp_path / "checkpoints") == []
    assert resume(tmp_path) is None


def test_failing_resave_of_a_step_keeps_the_old_copy(tmp_path):
    old = save(tmp_path, 2)
    before = (old / "optimizer.pt").read_bytes()

    def fail(d: Path) -> None:
        raise RuntimeError("learner died")

    with pytest.raises(RuntimeError):
        save(tmp_path, 2, write=fail)
    assert names(tmp_path / "checkpoints") == ["step_000002"]
    assert (old / "optimizer.pt").read_bytes() == before
    assert checkpoint.validate(old)["step"] == 2


def test_resave_of_a_step_replaces_it(tmp_path):
    save(tmp_path, 2)

    def other(d: Path) -> None:
        fake_learner(d)
        (d / "learner.json").write_text(json.dumps({"version": 99, "kl_ctl": {"value": 0.1}}))

    path = save(tmp_path, 2, write=other)
    assert json.loads((path / "learner.json").read_text())["version"] == 99
    assert names(tmp_path / "checkpoints") == ["step_000002"]


# ---- keep the newest M ------------------------------------------------------------------------------


def test_keep_last_m_and_stale_tmp_dirs_removed(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".tmp-step_000001-deadbeef").mkdir()  # a crash mid-write, long ago
    for step in range(1, 6):
        save(tmp_path, step, keep=2)
    assert names(root) == ["step_000004", "step_000005"]
    assert [Path(c.path).name for c in checkpoint.open_store(tmp_path).list_complete()] == ["step_000004", "step_000005"]


# ---- resume resolution ---------------------------------------------------------------------------------


def test_resume_auto_takes_newest_complete(tmp_path):
    assert resume(tmp_path) is None  # no checkpoints dir at all
    save(tmp_path, 2)
    save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    (root / "step_000006").mkdir()  # no COMPLETE marker: never used
    (root / ".tmp-step_000008-0123abcd").mkdir()
    assert resume(tmp_path) == root / "step_000004"


def test_resume_auto_takes_the_newest_marked_one_so_that_its_damage_is_reported(tmp_path):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    _break("truncated_optimizer", newest)  # marked, but its files no longer match the marker
    store = checkpoint.open_store(tmp_path)
    assert [c.step for c in store.list_complete()] == [2]
    found = checkpoint.find_resume(store, "auto")
    assert Path(found.path) == newest  # not silently the one before: read_state names the damage
    with pytest.raises(UserError, match="step_000004 is incomplete or corrupt.*optimizer.pt"):
        checkpoint.read_state(store, found, tmp_path / "no_model")


def test_resume_never(tmp_path):
    assert resume(tmp_path, "never") is None
    save(tmp_path, 2)
    with pytest.raises(UserError, match="checkpoint.resume=never"):
        resume(tmp_path, "never")


def test_resume_explicit_path(tmp_path):
    elsewhere = save(tmp_path / "other_run", 3)
    assert resume(tmp_path, str(elsewhere)) == elsewhere
    with pytest.raises(UserError, match="does not exist"):
        resume(tmp_path, str(tmp_path / "nope"))


def test_location_is_checkpoint_location_or_the_absolute_output_dir(tmp_path, monkeypatch):
    from ray_rlhf.config import load_config

    monkeypatch.chdir(tmp_path)
    assert checkpoint.location(load_config("tiny", ["output_dir=runs/a"])) == str(tmp_path / "runs" / "a")
    cfg = load_config("tiny", ["output_dir=runs/a", "checkpoint.location=s3://bkt/a"])
    assert checkpoint.location(cfg) == "s3://bkt/a"


# ---- validation -------------------------------------------------------------------------------------------


def _break(kind: str, d: Path) -> None:
    if kind == "no_marker":
        (d / "COMPLETE").unlink()
    elif kind == "no_optimizer":
        (d / "optimizer.pt").unlink()
    elif kind == "torn_learner_json":
        (d / "learner.json").write_text('{"version": 3, "kl')
    elif kind == "driver_json_without_step":
        (d / "driver.json").write_text(json.dumps({"version": 1, "data": {}}))
    elif kind == "truncated_value_head":
        p = d / "value_head.safetensors"
        p.write_bytes(p.read_bytes()[:-3])
    elif kind == "garbage_rng":
        (d / "rng.safetensors").write_bytes(b"\x00" * 4)
    elif kind == "truncated_policy":
        p = d / "policy" / "model.safetensors"
        p.write_bytes(p.read_bytes()[:20])
    elif kind == "no_policy_weights":
        (d / "policy" / "model.safetensors").unlink()
    elif kind == "truncated_optimizer":
        p = d / "optimizer.pt"
        p.write_bytes(p.read_bytes()[:100])


@pytest.mark.parametrize("kind,fragment", [
    ("no_marker", "missing COMPLETE"),
    ("no_optimizer", "missing optimizer.pt"),
    ("torn_learner_json", "learner.json unreadable"),
    ("driver_json_without_step", "driver.json unreadable"),
    ("truncated_value_head", "value_head.safetensors is truncated"),
    ("garbage_rng", "rng.safetensors is truncated"),
    ("truncated_policy", "policy/model.safetensors is truncated"),
    ("no_policy_weights", "no policy/*.safetensors"),
    ("truncated_optimizer", "optimizer.pt is not a readable torch file"),
])
def test_validate_rejects_incomplete_or_corrupt(tmp_path, kind, fragment):
    path = save(tmp_path, 5)
    _break(kind, path)
    with pytest.raises(UserError) as info:
        checkpoint.validate(path)
    msg = str(info.value)
    assert fragment in msg and "step_000005" in msg and "\n" not in msg
    assert "delete that directory" in msg  # the fix


def test_check_compatible(tmp_path):
    path = save(tmp_path, 1)
    mine = tmp_path / "model"
    mine.mkdir()
    (mine / "config.json").write_text(json.dumps(POLICY_CONFIG))
    checkpoint.check_compatible(path, mine)
    (mine / "config.json").write_text(json.dumps({**POLICY_CONFIG, "hidden_size": 128}))
    with pytest.raises(UserError, match="different model.*hidden_size 64 vs 128"):
        checkpoint.check_compatible(path, mine)


def test_check_writable(tmp_path):
    checkpoint.check_writable(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run" / "checkpoints").is_dir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="cannot write checkpoints to .*a_file.*output_dir"):
        checkpoint.check_writable(tmp_path / "a_file" / "run")


# ---- nothing is ever unpickled ----------------------------------------------------------------------------


class _Evil:
    """Unpickling this calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_every_torch_load_in_the_package_is_weights_only():
    import ray_rlhf

    root = Path(ray_rlhf.__file__).parent
    calls = []
    for f in root.rglob("*.py"):
        src = f.read_text()
        assert not re.search(r"\bpickle\.loads?\(", src), f"{f} unpickles"
        for m in re.finditer(r"torch\.load\(", src):
            call = src[m.start(): src.index("\n", m.start())]
            calls.append(call)
            assert "weights_only=True" in call, f"{f}: {call}"
    assert calls, "expected the learner's torch.load"


def test_learner_load_state_refuses_a_malicious_optimizer_pickle(tmp_path, tiny_policy_path):
    from ray_rlhf.config.schema import KLConfig, PPOConfig
    from ray_rlhf.learning.learner import Learner

    learner = Learner(str(tiny_policy_path), PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8), KLConfig())
    d = tmp_path / "ckpt"
    d.mkdir()
    learner.save_state(d)
    learner.load_state(d)  # the real file loads

    marker = tmp_path / "pwned"
    torch.save({"state": {0: _Evil(marker)}, "param_groups": []}, d / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError):
        learner.load_state(d)
    assert not marker.exists(), "the checkpoint's pickle was executed"


def test_config_changes_names_the_keys_that_differ():
    from ray_rlhf.checkpoint import config_changes
    from ray_rlhf.config import load_config

    saved = load_config("tiny").model_dump(mode="json")
    assert config_changes(saved, load_config("tiny", ["steps=99", "logging.tensorboard=false"]).model_dump(mode="json")) == []
    changed = load_config("tiny", ["ppo.lr=0.01", "seed=3"]).model_dump(mode="json")
    assert config_changes(saved, changed) == ["ppo.lr", "seed"]
    assert config_changes(None, changed) == []
