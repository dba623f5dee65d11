"""Checkpoints: atomic, complete or absent, newest M kept, resumable.

Layout of ``<output_dir>/checkpoints/step_000010/``::

    policy/                 the policy LM in Hugging Face format (safetensors + tokenizer)
    value_head.safetensors  the value head (critic/ too, with a separate critic)
    optimizer.pt            AdamW state (tensors and plain values; loaded with weights_only=True)
    rng.safetensors         torch RNG states of the learner
    learner.json            policy version, KL-controller state
    driver.json             step, data cursor, pool restarts, config digest
    COMPLETE                written last; a directory without it is never used

A checkpoint is written into ``.tmp-step_000010-<random>`` and renamed into place only once
``COMPLETE`` is in it, so a crash mid-write never leaves a half checkpoint that resume would pick up.
Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from ray_rlhf.errors import UserError

MARKER = "COMPLETE"
REQUIRED = ("policy", "value_head.safetensors", "optimizer.pt", "rng.safetensors", "learner.json", "driver.json")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def check_writable(output_dir: str | Path) -> None:
    """Fail early (before any expensive work) if checkpoints cannot be written."""
    d = checkpoints_dir(output_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"cannot write checkpoints to {d}: {e.strerror or e}; set output_dir to a writable directory"
        ) from None


def save(output_dir: str | Path, step: int, write_learner: Callable[[Path], None], driver_state: dict[str, Any],
         keep: int) -> Path:
    """Write a checkpoint atomically; ``write_learner(tmp_dir)`` writes the learner's part."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_learner(tmp)
        (tmp / "driver.json").write_text(json.dumps(driver_state, indent=1, sort_keys=True))
        (tmp / MARKER).write_text(str(step))
        if final.exists():  # re-running a step after a resume: replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep)
    return final


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and unmarked directories are skipped)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; also remove stale temporary directories."""
    done = sorted((p for p in root.glob("step_*") if (p / MARKER).is_file()), key=lambda p: p.name)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def validate(path: Path) -> dict[str, Any]:
    """Check a checkpoint directory is whole; return its driver state. One-line UserError if not."""
    fix = "delete it or set checkpoint.resume=never with a new output_dir"
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist; set checkpoint.resume to auto, never or a checkpoint dir")
    missing = [name for name in (MARKER, *REQUIRED) if not (path / name).exists()]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete or corrupt (missing {', '.join(missing)}); {fix}")
    try:
        state = json.loads((path / "driver.json").read_text())
        json.loads((path / "learner.json").read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} is corrupt (driver.json/learner.json unreadable: {e}); {fix}") from None
    return state


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from (``auto``: newest complete one; ``never``: none), or None."""
    if resume == "never":
        if complete_checkpoints(output_dir):
            raise UserError(
                f"{output_dir} already holds checkpoints and checkpoint.resume=never; "
                "use checkpoint.resume=auto to continue it, or a new output_dir"
            )
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    return Path(resume)
