"""Data parallelism for the learner ranks: DDP or FSDP2 over the learner group's process group.

``ddp``: every rank holds the whole policy (+ value head); ``DistributedDataParallel`` all-reduces
the gradients at the last micro-batch of each minibatch. ``fsdp``: ``fully_shard`` (FSDP2) on every
decoder layer and the root: parameters, gradients and AdamW state are sharded; parameters are
all-gathered for each forward, gradients reduce-scattered after the backward.

Both frameworks AVERAGE the gradients over the ranks; the learner's losses are token sums divided
by the GLOBAL minibatch token count, so each rank's loss is scaled by the world size
(:data:`loss_scale`) and the result is the single-rank gradient. Full (unsharded) state dicts for
checkpoints and the weight broadcast come from ``torch.distributed.checkpoint.state_dict`` --
world-size independent, so a checkpoint resumes at any number of ranks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (the FSDP units)."""
    for name in ("_no_split_modules",):
        classes = set(getattr(model, name, None) or [])
        if classes:
            return [m for m in model.modules() if type(m).__name__ in classes]
    return []


def compile_layers(*models: nn.Module | None) -> int:
    """``torch.compile`` each decoder layer of ``models`` in place (dynamic shapes: sequence lengths
    change every micro-batch); returns how many. Per layer, as FSDP2 wants it (compiled blocks,
    then ``fully_shard``), and the attention-mask and loss code around them stays eager."""
    n = 0
    for model in models:
        for layer in decoder_layers(model) if model is not None else []:
            layer.compile(dynamic=True)
            n += 1
    return n


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or the module under a DDP wrapper) was sharded by FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(module), FSDPModule)


def wrap(module: nn.Module, strategy: str, world_size: int, device: str, dtype: str = "float32") -> nn.Module:
    """``module`` prepared for ``world_size`` ranks of a joined process group: DDP (itself at one
    rank), or FSDP2 -- at one rank too (the GPU check runs FSDP2's bf16 path at world size 1)."""
    if strategy == "ddp" and world_size == 1:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=None if device == "cpu" else [torch.cuda.current_device()],
                                       find_unused_parameters=False)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cpu" if device == "cpu" else "cuda", (world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" else None
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for layer in decoder_layers(module):
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)
        return module
    raise ValueError(f"unknown learner.strategy {strategy!r} (ddp or fsdp)")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place: no wrapper)."""
    return getattr(model, "module", model)


def loss_scale(world_size: int) -> float:
    """Factor on each rank's loss so that the frameworks' gradient AVERAGE is the gradient SUM."""
    return float(world_size)


def accumulating(model: nn.Module, strategy: str, last: bool):
    """Context of one micro-batch's backward: gradient sync only at the minibatch's last one."""
    if last:
        return contextlib.nullcontext()
    if strategy == "ddp" and hasattr(model, "no_sync"):
        return model.no_sync()
    if strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        return _ResyncOnExit(model)
    return contextlib.nullcontext()


class _ResyncOnExit(contextlib.AbstractContextManager):
    def __init__(self, model):
        self.model = model

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False


def full_state_dict(model: nn.Module, world_size: int, strategy: str) -> dict[str, torch.Tensor]:
    """The whole module's state dict as plain CPU tensors (every rank must call it under FSDP)."""
    module = unwrap(model)
    if not is_sharded(module):
        return {k: v.detach() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], world_size: int, strategy: str,
                         strict: bool = True) -> None:
    """Whole tensors into the (sharded) module; ``strict=False``: the tensors ``state`` holds, the
    others kept (LoRA's resume: adapters and value head only, every rank holding the same)."""
    module = unwrap(model)
    if not is_sharded(module):
        module.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def optimizer_state(model: nn.Module, optimizer, world_size: int, strategy: str) -> dict:
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, world_size: int, strategy: str) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
