"""Checkpoints: atomic, complete or absent, newest M kept, resumable.

Layout of ``<output_dir>/checkpoints/step_000010/``::

    policy/                 the policy LM in Hugging Face format (safetensors + tokenizer)
    value_head.safetensors  the value head (critic/ too, with a separate critic)
    optimizer.pt            AdamW state (tensors and plain values; loaded with weights_only=True)
    rng.safetensors         torch RNG states of the learner
    learner.json            policy version, KL-controller state
    driver.json             step, data cursor, pool restarts, the resolved config
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
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    """Write a checkpoint atomically; ``write_learner(tmp_dir)`` writes the learner's part.

    Either the whole checkpoint appears under its final name or nothing does: a failure anywhere
    (including in ``write_learner``) removes the temporary directory and re-raises. Re-saving an
    existing step moves the old copy aside first and deletes it only after the new one is in place.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old: Path | None = None
    try:
        write_learner(tmp)
        (tmp / "driver.json").write_text(json.dumps(driver_state, indent=1, sort_keys=True))
        (tmp / MARKER).write_text(str(step))
        if final.exists():  # re-running a step after a resume: replace the old copy
            old = root / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
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


def _safetensors_problem(path: Path, name: str) -> str | None:
    """Why ``path`` is not a whole safetensors file (header and data region checked), or None.

    ``name`` is how the message refers to the file. Format: an 8-byte little-endian header
    length N, then N bytes of JSON mapping each tensor to ``data_offsets`` [begin, end) in the
    data region that follows; the file ends where the last tensor does. A truncated or
    overwritten file fails one of these checks.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{name} is truncated ({size} bytes)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"{name} is truncated (header of {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(n))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
            end = max(ends, default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{name} has an unreadable header"
    if 8 + n + end != size:
        return f"{name} is truncated or padded ({size} bytes, header says {8 + n + end})"
    return None


def _problems(path: Path) -> list[str]:
    """Everything wrong with checkpoint ``path`` that can be seen without loading tensors."""
    missing = [name for name in (MARKER, *REQUIRED) if not (path / name).exists()]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    for name in ("driver.json", "learner.json", "policy/config.json"):
        try:
            data = json.loads((path / name).read_text())
            if name == "driver.json":
                int(data["step"]), int(data["version"]), dict(data["data"])
            elif name == "learner.json":
                int(data["version"]), dict(data["kl_ctl"])
        except FileNotFoundError:
            problems.append(f"missing {name}")
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{name} unreadable ({type(e).__name__}: {e})")
    tensors = sorted(path.glob("*.safetensors")) + sorted(path.glob("*/*.safetensors"))
    if not any(p.parent.name == "policy" for p in tensors):
        problems.append("no policy/*.safetensors")
    problems += [p for p in (_safetensors_problem(t, str(t.relative_to(path))) for t in tensors) if p]
    try:
        with zipfile.ZipFile(path / "optimizer.pt") as z:  # torch.save's format; truncation loses the index
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        problems.append(f"optimizer.pt is not a readable torch file ({e})")
    return problems


def validate(path: Path) -> dict[str, Any]:
    """Check a checkpoint directory is whole; return its driver state. One-line UserError if not.

    Reads only the JSON files and the safetensors/zip indexes (cheap at any model size); nothing
    is unpickled.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist; set checkpoint.resume to auto, never or a checkpoint dir")
    problems = _problems(path)
    if problems:
        raise UserError(
            f"checkpoint {path} is incomplete or corrupt ({'; '.join(problems)}); delete that directory "
            "(checkpoint.resume=auto then takes the one before it) or start afresh with a new output_dir"
        )
    return json.loads((path / "driver.json").read_text())


def check_compatible(path: Path, policy_path: Path) -> None:
    """The checkpoint's policy must have the run's model architecture (compares config.json shapes)."""
    keys = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size")
    try:
        mine = json.loads((Path(policy_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # the policy itself was checked by preflight; nothing to compare against
    theirs = json.loads((Path(path) / "policy" / "config.json").read_text())
    diff = [f"{k} {theirs.get(k)} vs {mine.get(k)}" for k in keys if theirs.get(k) != mine.get(k)]
    if diff:
        raise UserError(
            f"checkpoint {path} holds a different model than {policy_path} ({', '.join(diff)}); resume with the "
            "model it was made with, or start afresh with a new output_dir"
        )


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


RESUME_SENSITIVE = ("seed", "model", "data", "rollout", "ppo", "kl")
"""Config sections whose change makes a resumed run differ from the run it continues."""


def config_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Dotted keys of :data:`RESUME_SENSITIVE` sections whose value differs from the checkpoint's."""
    if not saved:
        return []

    def flat(d: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else k))
        return out

    a = flat({k: saved.get(k) for k in RESUME_SENSITIVE}, "")
    b = flat({k: current.get(k) for k in RESUME_SENSITIVE}, "")
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
