"""The learner's part of a checkpoint: written by rank 0, read by every rank, any world size.

``policy/`` (the LM in Hugging Face format: safetensors + tokenizer; loads in transformers and
vLLM; with LoRA, the adapters merged in), ``adapter/`` (LoRA only: the adapters as a ``peft``
adapter folder -- what a resume loads, over the frozen base of ``model.path``),
``value_head.safetensors`` (+ ``critic/``; neither without a critic), ``optimizer.pt`` (AdamW
state: tensors and plain values, read back with ``weights_only=True``; with LoRA, the adapters'
and the value head's only), ``rng.safetensors`` (the minibatch-shuffling and torch RNG states)
and ``learner.json`` (version, KL controller, the group's size and strategy, ``lora.rank``).
Nothing is pickled. Weights are full (unsharded) tensors, so a
checkpoint resumes at any number of ranks; the optimizer state is too, except that FSDP keys it
by parameter name and DDP / one rank by position: a switch between the two is refused. The names
are :mod:`ray_rlhf.checkpoint.layout`'s; where and how atomically the part is stored is
:mod:`ray_rlhf.checkpoint`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ray_rlhf.checkpoint.layout import ADAPTER, CRITIC, LEARNER_STATE, OPTIMIZER, POLICY, RNG, VALUE_HEAD
from ray_rlhf.errors import UserError
from ray_rlhf.learning import parallel
from ray_rlhf.models.output_head import load_hf_state, read_hf_state, tied_parameter_groups


def _optimizer_format(learner) -> str:
    return "by_name" if learner.sharded else "by_position"


def save(learner, d: Path) -> None:
    """Every rank calls it (FSDP gathers the full state); rank 0 writes into ``d``."""
    from safetensors.torch import save_file

    opt = learner.options
    full = parallel.full_state_dict(learner.model, opt.world_size, opt.strategy) if learner.sharded else None
    optim = parallel.optimizer_state(learner.train_model, learner.optimizer, opt.world_size, opt.strategy)
    if learner.comm.rank != 0:
        return
    part = (lambda prefix: {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}) if full \
        else None
    lm_state = part("lm.") if full else None
    adapters = learner.adapters
    if adapters is not None:  # the merged model (loads anywhere), and the adapters alone (what resumes)
        peft_state = {f"base_model.model.{k}": v for k, v in lm_state.items()} if full else None
        lm_state = adapters.merged_state(lm_state)
        adapters.peft.save_pretrained(d / ADAPTER, safe_serialization=True,
                                      **({"state_dict": peft_state} if full else {}))
    learner.model.lm.save_pretrained(d / POLICY, safe_serialization=True,
                                     **({"state_dict": lm_state} if lm_state is not None else {}))
    if learner.tokenizer is not None:
        learner.tokenizer.save_pretrained(d / POLICY)
    if learner.model.critic is not None:
        kw = {"state_dict": part("critic.")} if full else {}
        learner.model.critic.save_pretrained(d / CRITIC, safe_serialization=True, **kw)
    if learner.model.value_head is not None:
        head = part("value_head.") if full else learner.model.value_head.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(d / VALUE_HEAD))
    torch.save(optim, d / OPTIMIZER)
    save_file({"learner": learner.rng.get_state(), "torch": torch.get_rng_state()}, str(d / RNG))
    meta = {"version": learner.version, "kl_ctl": learner.kl_ctl.state_dict(), "world_size": opt.world_size,
            "strategy": opt.strategy, "optimizer_format": _optimizer_format(learner), "critic": learner.uses_critic,
            "lora_rank": opt.lora.rank}
    (d / LEARNER_STATE).write_text(json.dumps(meta))


def load(learner, d: Path) -> None:
    """Every rank restores what :func:`save` wrote (the model architecture must match)."""
    from safetensors.torch import load_file

    opt = learner.options
    meta = json.loads((d / LEARNER_STATE).read_text())
    saved = (meta.get("optimizer_format", "by_position"), meta.get("world_size", 1), meta.get("strategy", "ddp"))
    if saved[0] != _optimizer_format(learner):
        raise UserError(
            f"checkpoint {d.parent.name}/{d.name} was written by {saved[1]} learner rank(s) with learner.strategy="
            f"{saved[2]}; this run has learner.num={opt.world_size} with learner.strategy={opt.strategy}, and their "
            "optimizer states are keyed differently; resume with the same learner.strategy (and learner.num > 1 for fsdp)"
        )
    if meta.get("critic", True) != learner.uses_critic:
        raise UserError(f"checkpoint {d} {'has' if meta.get('critic', True) else 'has no'} value function but this run's "
                        f"algo.estimator={opt.algo.estimator} {'needs' if learner.uses_critic else 'has'} none; resume "
                        "with the estimator it was made with")
    if meta.get("lora_rank", 0) != opt.lora.rank:
        raise UserError(f"checkpoint {d} was written with lora.rank={meta.get('lora_rank', 0)} but this run has "
                        f"lora.rank={opt.lora.rank}; resume with the lora.rank it was made with")
    if learner.adapters is not None:  # the base weights are model.path's, frozen: load the adapters only
        from peft.utils import load_peft_weights

        saved = load_peft_weights(str(d / ADAPTER), device=str(learner.device))
        if learner.sharded:  # every rank: the saved adapters (and value head) as whole tensors, resharded
            state = {f"lm.{k}": v for k, v in learner.adapters.lm_keys(saved).items()}
            if learner.model.value_head is not None:
                state.update({f"value_head.{k}": v for k, v in load_file(str(d / VALUE_HEAD)).items()})
            parallel.load_full_state_dict(learner.model, state, opt.world_size, opt.strategy, strict=False)
        else:
            learner.adapters.load_adapter_state(saved)
            if learner.model.value_head is not None:
                learner.model.value_head.load_state_dict(load_file(str(d / VALUE_HEAD)))
    elif learner.sharded:
        state = {f"lm.{k}": v for k, v in _with_ties(learner.model.lm, read_hf_state(d / POLICY)).items()}
        if learner.model.critic is not None:
            state.update({f"critic.{k}": v for k, v in _with_ties(learner.model.critic, read_hf_state(d / CRITIC)).items()})
        if learner.model.value_head is not None:
            state.update({f"value_head.{k}": v for k, v in load_file(str(d / VALUE_HEAD)).items()})
        parallel.load_full_state_dict(learner.model, state, opt.world_size, opt.strategy)
    else:
        load_hf_state(learner.model.lm, d / POLICY)  # strict, and tied weights stay tied
        if learner.model.critic is not None:
            load_hf_state(learner.model.critic, d / CRITIC)
        if learner.model.value_head is not None:
            learner.model.value_head.load_state_dict(load_file(str(d / VALUE_HEAD)))
    optim = torch.load(d / OPTIMIZER, weights_only=True, map_location=learner.device)
    parallel.load_optimizer_state(learner.train_model, learner.optimizer, optim, opt.world_size, opt.strategy)
    rng = load_file(str(d / RNG))
    learner.rng.set_state(rng["learner"])
    torch.set_rng_state(rng["torch"])
    learner.version = int(meta["version"])
    learner.kl_ctl.load_state_dict(meta["kl_ctl"])


def _with_ties(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved tied model's state with every alias of a shared tensor filled in (save_pretrained
    keeps one name of each)."""
    for names in tied_parameter_groups(model):
        present = next((state[n] for n in names if n in state), None)
        if present is not None:
            for n in names:
                state[n] = present
    return state
