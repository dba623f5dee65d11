"""The names inside a checkpoint location: the one definition of each (see :mod:`ray_rlhf.checkpoint`).

``<location>/checkpoints/step_000010/`` holds one checkpoint (in an object store, one sub-prefix
per save under it); :data:`MARKER` is written last. The learner writes its part under the names
below (:mod:`ray_rlhf.learning.checkpointing`), the driver writes :data:`DRIVER_STATE`
(:mod:`ray_rlhf.run.state`), and :mod:`ray_rlhf.checkpoint.integrity` checks them.
"""

from __future__ import annotations

CHECKPOINTS = "checkpoints"
"""The folder of a location (``checkpoint.location`` or ``output_dir``) that holds the checkpoints."""
MARKER = "COMPLETE"
"""Written last: a checkpoint without it (or whose files do not match it) is never used."""
FORMAT = 1
"""Version of the marker's JSON."""
STEP_PREFIX = "step_"

POLICY = "policy"
"""The policy LM in Hugging Face format (safetensors + tokenizer), a folder."""
CRITIC = "critic"
"""A separate critic (``model.critic_path``) in Hugging Face format, a folder."""
VALUE_HEAD = "value_head.safetensors"
ADAPTER = "adapter"
"""LoRA runs (``lora.rank > 0``): the policy's adapters as a ``peft`` adapter folder
(``adapter_model.safetensors`` + ``adapter_config.json``); :data:`POLICY` then holds the merged model."""
OPTIMIZER = "optimizer.pt"
"""AdamW state: tensors and plain values, read back with ``weights_only=True``."""
RNG = "rng.safetensors"
LEARNER_STATE = "learner.json"
DRIVER_STATE = "driver.json"
REQUIRED = (POLICY, OPTIMIZER, RNG, LEARNER_STATE, DRIVER_STATE)
"""What every complete checkpoint holds besides the marker (the value head only with a critic)."""


def step_dir_name(step: int) -> str:
    """``step_000010``: the directory (or object prefix) of step 10's checkpoint."""
    return f"{STEP_PREFIX}{step:06d}"


def step_of(name: str) -> int:
    """The step of a :func:`step_dir_name` (``step_000010`` -> 10)."""
    return int(name.split("_")[1])
