"""``ray-rlhf export [--merge] RUN_DIR OUT_DIR``: a run's newest complete checkpoint as a model
directory other tools load.

``--merge`` (or a full fine-tuning run): the checkpoint's ``policy/`` -- a Hugging Face causal-LM
directory with its tokenizer; for a LoRA run it already holds the adapters merged in fp32
(W + alpha/r * B A), so ``transformers`` and vLLM load it as they load any model. Without
``--merge`` a LoRA run exports its ``adapter/`` folder (``PeftModel.from_pretrained(base, OUT)``).
``RUN_DIR`` is a run's ``output_dir``: a local path or a store URI (``s3://...``). The copy goes to a
temporary directory beside ``OUT_DIR`` and is renamed into place: never half-written.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ray_rlhf.checkpoint.layout import ADAPTER, POLICY
from ray_rlhf.checkpoint.uri import open_store
from ray_rlhf.errors import UserError


def export_checkpoint(run_dir: str, out_dir: str | Path, merge: bool = False) -> tuple[Path, int, str]:
    """Copy the newest complete checkpoint's model of ``run_dir`` to ``out_dir``; returns
    (``out_dir``, the checkpoint's step, what was written: ``policy`` or ``adapter``)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory; name a new OUT_DIR")
    store = open_store(run_dir)
    ckpt = store.latest()
    if ckpt is None:
        raise UserError(f"{run_dir} holds no complete checkpoint (looked in {store.checkpoints}); "
                        "give a run's output_dir, with checkpoint.every set")
    lora = any(name.startswith(f"{ADAPTER}/") for name in ckpt.files)
    part = POLICY if merge or not lora else ADAPTER
    files = {name[len(part) + 1:]: size for name, size in ckpt.files.items() if name.startswith(f"{part}/")}
    if not files:
        raise UserError(f"checkpoint {ckpt.path} has no {part}/ folder; it is not a ray-rlhf checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        store.download_dir(f"{ckpt.path}/{part}", tmp, files)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, ckpt.step, part
