"""Is a local checkpoint whole, and does it hold the run's model? Checked without loading a tensor.

Reads only the JSON files and the safetensors/zip indexes (cheap at any model size); nothing is
unpickled.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from ray_rlhf.checkpoint.layout import (
    DRIVER_STATE,
    LEARNER_STATE,
    MARKER,
    OPTIMIZER,
    POLICY,
    REQUIRED,
    VALUE_HEAD,
)
from ray_rlhf.errors import UserError


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
    if not missing and _has_critic(path) and not (path / VALUE_HEAD).exists():
        missing = [VALUE_HEAD]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    for name in (DRIVER_STATE, LEARNER_STATE, f"{POLICY}/config.json"):
        try:
            data = json.loads((path / name).read_text())
            if name == DRIVER_STATE:
                int(data["step"]), int(data["version"]), dict(data["data"])
            elif name == LEARNER_STATE:
                int(data["version"]), dict(data["kl_ctl"])
        except FileNotFoundError:
            problems.append(f"missing {name}")
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{name} unreadable ({type(e).__name__}: {e})")
    tensors = sorted(path.glob("*.safetensors")) + sorted(path.glob("*/*.safetensors"))
    if not any(p.parent.name == POLICY for p in tensors):
        problems.append(f"no {POLICY}/*.safetensors")
    problems += [p for p in (_safetensors_problem(t, str(t.relative_to(path))) for t in tensors) if p]
    try:
        with zipfile.ZipFile(path / OPTIMIZER) as z:  # torch.save's format; truncation loses the index
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        problems.append(f"{OPTIMIZER} is not a readable torch file ({e})")
    return problems


def _has_critic(path: Path) -> bool:
    try:
        return bool(json.loads((path / LEARNER_STATE).read_text()).get("critic", True))
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: reported by the JSON check


def validate(path: Path) -> dict[str, Any]:
    """Check a checkpoint directory is whole; return its driver state. One-line UserError if not."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist; set checkpoint.resume to auto, never or a checkpoint dir")
    problems = _problems(path)
    if problems:
        raise UserError(
            f"checkpoint {path} is incomplete or corrupt ({'; '.join(problems)}); delete that directory "
            "(checkpoint.resume=auto then takes the one before it) or start afresh with a new output_dir"
        )
    return json.loads((path / DRIVER_STATE).read_text())


def check_compatible(path: Path, policy_path: Path, theirs: dict | None = None) -> None:
    """The checkpoint's policy must have the run's model architecture (compares config.json shapes;
    ``theirs``: the checkpoint's policy config, when it is not in a local ``path``)."""
    keys = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size")
    try:
        mine = json.loads((Path(policy_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # the policy itself was checked by preflight; nothing to compare against
    theirs = theirs if theirs is not None else json.loads((Path(path) / POLICY / "config.json").read_text())
    diff = [f"{k} {theirs.get(k)} vs {mine.get(k)}" for k in keys if theirs.get(k) != mine.get(k)]
    if diff:
        raise UserError(
            f"checkpoint {path} holds a different model than {policy_path} ({', '.join(diff)}); resume with the "
            "model it was made with, or start afresh with a new output_dir"
        )
