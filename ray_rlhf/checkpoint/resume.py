"""Which checkpoint a run resumes from, its driver state, and what changed in the config since."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_rlhf.checkpoint.integrity import check_compatible, validate
from ray_rlhf.checkpoint.layout import DRIVER_STATE, MARKER, POLICY, STEP_PREFIX, step_of
from ray_rlhf.checkpoint.local import LocalStore
from ray_rlhf.checkpoint.objects import ObjectStore
from ray_rlhf.checkpoint.store import Checkpoint
from ray_rlhf.errors import UserError


def find_resume(store: LocalStore | ObjectStore, resume: str) -> Checkpoint | None:
    """The checkpoint a run resumes from in ``store`` (``auto``: its newest complete one;
    ``never``: none, and the store must hold none; else a local checkpoint directory)."""
    if resume in ("auto", "never"):
        found = store.latest()
        if isinstance(store, LocalStore):  # the newest MARKED one, complete or not: validated deeply after
            marked = sorted(d for d in Path(store.checkpoints).glob(f"{STEP_PREFIX}*") if (d / MARKER).is_file())
            if marked and (found is None or Path(found.path) != marked[-1]):
                found = Checkpoint(step_of(marked[-1].name), "", str(marked[-1]), {})
        if resume == "never" and found is not None:
            raise UserError(f"{store.uri} already holds checkpoints and checkpoint.resume=never; "
                            "use checkpoint.resume=auto to continue it, or a new output_dir")
        return found if resume == "auto" else None
    path = Path(resume)
    state = validate(path)
    return Checkpoint(int(state["step"]), "", str(path), {})


def read_state(store: LocalStore | ObjectStore, ckpt: Checkpoint, policy_path: Path) -> dict[str, Any]:
    """A checkpoint's driver state, after checking it is whole and holds the run's model: a local
    one is validated file by file (:func:`~ray_rlhf.checkpoint.integrity.validate`); a remote one is
    whole by its marker (every file listed with its size) and its JSON is read."""
    if isinstance(store, LocalStore) or not ckpt.save_id:
        state = validate(Path(ckpt.path))
        check_compatible(Path(ckpt.path), policy_path)
        return state
    try:
        state = json.loads(store.read_bytes(ckpt, DRIVER_STATE))
        int(state["step"]), int(state["version"]), dict(state["data"])
        theirs = json.loads(store.read_bytes(ckpt, f"{POLICY}/config.json"))
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
