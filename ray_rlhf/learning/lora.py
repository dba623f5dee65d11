"""LoRA on the learner's policy with ``peft``: trainable adapters, the reference for free, merged weights.

Hu et al. 2021 (LoRA, eq. 3): each adapted linear layer computes ``h = W x + (alpha / r) B A x``
with ``W`` (out, in) frozen, ``A`` (r, in) random and ``B`` (out, r) zero at the start, so the
adapted model starts equal to the base model. :class:`Adapters` owns that for one policy LM:

* :func:`peft.get_peft_model` injects the LoRA layers into the LM **in place** (the LM object the
  policy holds is the one peft wraps; its trunk, head and config are unchanged) and freezes every
  base weight; the value head, outside the LM, trains fully;
* the reference is the same LM under peft's ``disable_adapter()`` (:class:`AdapterOffReference`):
  ``W x`` exactly, the base model's log-probs, with no second copy of the weights;
* :meth:`Adapters.merged_state` is what the generators load (``lora.sync=merged``): every adapted
  ``W`` replaced by ``W + (alpha / r) B A`` computed in float32, under the base model's Hugging Face
  names (no ``base_model.model.``, ``.base_layer`` or ``lora_`` keys), the other tensors as they are;
* :meth:`Adapters.adapter_state` / :meth:`Adapters.load_adapter_state`: the adapters alone, for
  checkpoints (peft's own key names, adapter name removed);
* :meth:`Adapters.payload`: the adapters, their config and a probe of the adapted policy's
  log-probs: what ``lora.sync=adapter`` sends (:mod:`ray_rlhf.sync.adapter`).

Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ray_rlhf.sync.adapter import AdapterPayload, probe_token_ids

ADAPTER = "default"
"""peft's adapter name (one adapter per policy)."""


@dataclass(frozen=True)
class LoraSpec:
    """``lora.*`` resolved for a learner rank (rank 0 = off)."""

    rank: int = 0
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    """Names or suffixes of the adapted linear modules; None: every linear layer of the decoder trunk."""
    dropout: float = 0.0
    sync: str = "merged"
    """``lora.sync`` resolved: ``merged`` (the learner exports merged full weights) or ``adapter``
    (it exports the adapters alone, :meth:`Adapters.payload`)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's projections, weight stored (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_modules(lm: nn.Module) -> list[str]:
    """Full names (within ``lm``) of the linear modules of its decoder trunk (``get_decoder()``):
    attention and MLP projections; the LM head is outside the trunk."""
    trunk = lm.get_decoder()
    prefix = next(name for name, m in lm.named_modules() if m is trunk)
    return [f"{prefix}.{n}" if prefix else n for n, m in trunk.named_modules() if _is_linear(m)]


def _matches(name: str, target: str) -> bool:
    """peft's rule: a module name matches a target equal to it or ending in ``.target``."""
    return name == target or name.endswith("." + target)


def resolve_targets(lm: nn.Module, targets: tuple[str, ...] | list[str] | None) -> list[str]:
    """The full names of the linear modules that get adapters. Raises ValueError naming the
    model's linear modules (their last name parts) when a target matches none of them."""
    names = linear_modules(lm)
    if targets is None:
        return names
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing or not targets:
        raise ValueError(f"lora.target_modules={list(targets)}: {', '.join(missing) or 'an empty list'} matches no linear "
                         f"module of the model; its linear modules are {', '.join(short)}")
    return [n for n in names if any(_matches(n, t) for t in targets)]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters AdamW updates: those that require a gradient (all of them without LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


class Adapters:
    """peft LoRA adapters injected into one causal LM (see the module docstring)."""

    def __init__(self, lm: nn.Module, spec: LoraSpec):
        from peft import LoraConfig, get_peft_model

        self.spec = spec
        self.lm = lm
        """The LM itself, LoRA layers injected in place (``peft.base_model.model``)."""
        self.targets = resolve_targets(lm, spec.target_modules)
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                            target_modules=self.targets, bias="none")
        self.peft = get_peft_model(lm, config, adapter_name=ADAPTER)
        """The ``PeftModel`` (its ``disable_adapter()`` gives the reference)."""
        assert self.peft.base_model.model is lm, "peft did not adapt the LM in place"

    def disabled(self) -> contextlib.AbstractContextManager:
        """The base model: every adapter off inside the context (peft's ``disable_adapter``)."""
        return self.peft.disable_adapter()

    def layers(self) -> dict[str, nn.Module]:
        """Adapted module name (within the LM) -> its peft LoRA layer."""
        from peft.tuners.lora import LoraLayer

        return {n: m for n, m in self.lm.named_modules() if isinstance(m, LoraLayer)}

    @torch.no_grad()
    def merged_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The LM's weights with the adapters merged, under the base model's Hugging Face names.

        ``W' = W + (alpha / r) B A`` for each adapted layer, computed in float32 and cast to ``W``'s
        dtype (transposed for ``Conv1D``'s (in, out) layout); every other tensor is the LM's own.
        ``state``: the LM's full state dict (peft's key names) when its parameters are sharded
        (FSDP2: gathered by every rank first); None: :attr:`lm`'s own. Shapes: W (out, in), B (out, r), A (r, in)."""
        state = self.lm.state_dict() if state is None else state
        merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
        for name, layer in self.layers().items():
            if ADAPTER not in layer.lora_A:
                continue
            w = state[f"{name}.base_layer.weight"]
            a = state[f"{name}.lora_A.{ADAPTER}.weight"].float()
            b = state[f"{name}.lora_B.{ADAPTER}.weight"].float()
            delta = (b @ a) * layer.scaling[ADAPTER]
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            merged[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
        return merged

    def adapter_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The adapter tensors (peft's names, without the adapter name), detached CPU copies.
        ``state``: the LM's full state dict when sharded (as :meth:`merged_state`)."""
        from peft import get_peft_model_state_dict

        full = None if state is None else {f"base_model.model.{k}": v for k, v in state.items()}
        tensors = get_peft_model_state_dict(self.peft, state_dict=full, adapter_name=ADAPTER)
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def lm_keys(self, adapter_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`adapter_state`'s tensors under the LM's own state-dict names (what a sharded
        load takes): ``base_model.model.X.lora_A.weight`` -> ``X.lora_A.default.weight``."""
        out = {}
        for key, value in adapter_state.items():
            key = key.removeprefix("base_model.model.")
            for part in (".lora_A.", ".lora_B."):
                key = key.replace(part, f"{part}{ADAPTER}.")
            out[key] = value
        return out

    @torch.no_grad()
    def payload(self) -> AdapterPayload:
        """What ``lora.sync=adapter`` sends: :meth:`adapter_state`, the adapters' config and the probe
        (:func:`~ray_rlhf.sync.adapter.probe_token_ids` and the adapted policy's log-probs of them,
        float32, dropout off; Shape: (T - 1,))."""
        config = self.lm.config.get_text_config() if hasattr(self.lm.config, "get_text_config") else self.lm.config
        ids = probe_token_ids(int(config.vocab_size))
        dropout = [layer.lora_dropout.training for layer in self.layers().values()]
        self.train_dropout(False)
        try:
            x = torch.tensor([ids], device=next(self.lm.parameters()).device)
            logits = self.lm(input_ids=x).logits[0, :-1].float()
        finally:
            for layer, on in zip(self.layers().values(), dropout):
                layer.lora_dropout.train(on)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, x[0, 1:, None])[:, 0].cpu()
        targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in self.targets}))
        tensors = {k: v.clone() for k, v in self.adapter_state().items()}  # copies: the payload is a snapshot
        return AdapterPayload(tensors, self.spec.rank, float(self.spec.alpha), targets, ids, logprobs)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`adapter_state` (every adapter tensor must be present)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft, state, adapter_name=ADAPTER)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing:
            raise ValueError(f"adapter state lacks {len(missing)} tensor(s), e.g. {missing[0]}")

    def train_dropout(self, active: bool) -> None:
        """LoRA dropout (``lora.dropout``) on for the update, off for passes without gradients."""
        for layer in self.layers().values():
            layer.lora_dropout.train(active)


class AdapterOffReference(nn.Module):
    """The frozen reference of a LoRA policy: the policy itself with its adapters disabled.

    Holds no parameters of its own (the policy is kept outside the module tree, so ``parameters()``,
    ``.to()`` and checkpoints of the reference see nothing): the base weights exist once. It runs
    the policy module's own forward (log-probs only), so that under FSDP2 the policy's root hook
    gathers the sharded weights first (calling the LM's trunk directly would skip it)."""

    def __init__(self, adapters: Adapters, policy: nn.Module):
        super().__init__()
        self._held = (adapters, policy)  # a tuple: not registered as submodules
        self.packed = False
        """Unused: the policy's own :attr:`~ray_rlhf.models.policy.PolicyWithValueHead.packed` applies."""

    @property
    def lm(self) -> None:
        """No LM of its own (``learner.compile`` and FSDP's reference sharding look for one)."""
        return None

    @torch.no_grad()
    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs of the response tokens under the base model (adapters off). Shape: (B, T)."""
        adapters, policy = self._held
        with adapters.disabled():
            return policy(prompt_ids, prompt_mask, response_ids, response_mask, temperature,
                          with_values=False, with_entropy=False).logprobs


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's tensor state (AdamW: two moments per trainable parameter)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)
