"""Checkpoints: atomic, complete or absent, newest M kept, resumable.

Layout of ``<output_dir>/checkpoints/step_000010/``::

    policy/                 the policy LM in Hugging Face format (safetensors + tokenizer)
    value_head.safetensors  the value head (critic/ too, with a separate critic; neither for a
                            critic-free estimator: learner.json says "critic": false)
    optimizer.pt            AdamW state (tensors and plain values; loaded with weights_only=True)
    rng.safetensors         torch RNG states of the learner
    learner.json            policy version, KL-controller state
    driver.json             step, data cursor, pool restarts, the resolved config
    COMPLETE                written last; a directory without it is never used

A checkpoint is written into ``.tmp-step_000010-<random>`` and renamed into place only once
``COMPLETE`` (a JSON list of its files and their sizes) is in it, so a crash mid-write never leaves
a half checkpoint that resume would pick up; with ``checkpoint.location`` an object-store URI the
same promise holds there (:mod:`ray_rlhf.storage`). Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray_rlhf.errors import UserError
from ray_rlhf.storage import Checkpoint, LocalStore, ObjectStore

MARKER = "COMPLETE"
REQUIRED = ("policy", "optimizer.pt", "rng.safetensors", "learner.json", "driver.json")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def check_writable(output_dir: str | Path) -> None:
    """Fail early (before any expensive work) if checkpoints cannot be written."""
    LocalStore(output_dir).check_writable()


def save(output_dir: str | Path, step: int, write_learner: Callable[[Path], None], driver_state: dict[str, Any],
         keep: int) -> Path:
    """Write a checkpoint atomically; ``write_learner(tmp_dir)`` writes the learner's part.

    Either the whole checkpoint appears under its final name or nothing does (see
    :class:`~ray_rlhf.storage.LocalStore`). Re-saving an existing step moves the old copy aside
    first and deletes it only after the new one is in place.
    """
    store = LocalStore(output_dir)
    files = {"driver.json": json.dumps(driver_state, indent=1, sort_keys=True).encode()}
    return Path(store.save(step, lambda staging: store.write_part(staging, write_learner), files, keep).path)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and unmarked directories are skipped)."""
    return [Path(c.path) for c in LocalStore(output_dir).list_complete()]


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
    if not missing and _has_critic(path) and not (path / "value_head.safetensors").exists():
        missing = ["value_head.safetensors"]
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


def _has_critic(path: Path) -> bool:
    try:
        return bool(json.loads((path / "learner.json").read_text()).get("critic", True))
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: reported by the JSON check


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


def check_compatible(path: Path, policy_path: Path, theirs: dict | None = None) -> None:
    """The checkpoint's policy must have the run's model architecture (compares config.json shapes;
    ``theirs``: the checkpoint's policy config, when it is not in a local ``path``)."""
    keys = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size")
    try:
        mine = json.loads((Path(policy_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # the policy itself was checked by preflight; nothing to compare against
    theirs = theirs if theirs is not None else json.loads((Path(path) / "policy" / "config.json").read_text())
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


def find_resume(store: LocalStore | ObjectStore, resume: str) -> Checkpoint | None:
    """The checkpoint a run resumes from in ``store`` (``auto``: its newest complete one;
    ``never``: none, and the store must hold none; else a local checkpoint directory)."""
    if resume in ("auto", "never"):
        found = store.latest()
        if isinstance(store, LocalStore):  # the newest MARKED one, complete or not: validated deeply after
            marked = sorted(d for d in checkpoints_dir(store.root).glob("step_*") if (d / MARKER).is_file())
            if marked and (found is None or Path(found.path) != marked[-1]):
                found = Checkpoint(int(marked[-1].name.split("_")[1]), "", str(marked[-1]), {})
        if resume == "never" and found is not None:
            raise UserError(f"{store.uri} already holds checkpoints and checkpoint.resume=never; "
                            "use checkpoint.resume=auto to continue it, or a new output_dir")
        return found if resume == "auto" else None
    path = Path(resume)
    state = validate(path)
    return Checkpoint(int(state["step"]), "", str(path), {})


def read_state(store: LocalStore | ObjectStore, ckpt: Checkpoint, policy_path: Path) -> dict[str, Any]:
    """A checkpoint's driver state, after checking it is whole and holds the run's model: a local
    one is validated file by file (:func:`validate`); a remote one is whole by its marker (every
    file listed with its size) and its JSON is read."""
    if isinstance(store, LocalStore) or not ckpt.save_id:
        state = validate(Path(ckpt.path))
        check_compatible(Path(ckpt.path), policy_path)
        return state
    try:
        state = json.loads(store.read_bytes(ckpt, "driver.json"))
        int(state["step"]), int(state["version"]), dict(state["data"])
        theirs = json.loads(store.read_bytes(ckpt, "policy/config.json"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {ckpt.path} is unreadable ({type(e).__name__}: {e}); delete it (resume then "
                        "takes the one before it) or start afresh with a new checkpoint.location") from None
    check_compatible(Path(ckpt.path), policy_path, theirs=theirs)
    return state


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
