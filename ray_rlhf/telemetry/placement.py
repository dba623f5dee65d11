"""Where the calling actor runs: its placement group, the GPUs Ray gave it and what torch sees.

Recorded by a colocated run (``<output_dir>/phases.jsonl``, :mod:`ray_rlhf.run.placement`), so a
user -- or a test on a Ray started with logical GPUs -- can see that generator ``i`` and learner
rank ``i`` share a GPU. With logical GPUs (``ray.num_gpus`` on a CPU machine) Ray still assigns GPU
ids and sets ``CUDA_VISIBLE_DEVICES``; ``cuda_available`` then says torch found no device, so the
actor computes on CPU.
"""

from __future__ import annotations

import os


def actor_placement(device: str | None = None) -> dict:
    """``placement_group`` (hex id or None), ``gpu_ids`` (Ray's), ``cuda_visible_devices``,
    ``cuda_available`` (torch) and the ``device`` the actor computes on, if given."""
    import ray
    import torch

    ctx = ray.get_runtime_context()
    return {"placement_group": ctx.get_placement_group_id(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_available": torch.cuda.is_available(), "device": device}
