"""The adapter-only weight sync's payload (``lora.sync=adapter``): what the learner sends, how a
generator writes it for vLLM, and the checks that prove the engine computes with it.

:class:`AdapterPayload` is the learner's LoRA adapters alone (``peft``'s state dict: ``A`` (r, in)
and ``B`` (out, r) of every adapted layer, names ``base_model.model.<module>.lora_A.weight``), their
config (rank, alpha, target modules) and a **probe**: a few fixed token ids
(:func:`probe_token_ids`) and the learner's adapted policy's log-probs of them. A generator writes
the adapters as a PEFT adapter folder (:func:`write_peft_dir`: ``adapter_config.json`` +
``adapter_model.safetensors``, the form vLLM's ``LoRARequest`` loads; vLLM 0.32 has no way to load
one from tensors in memory) and verifies delivery twice:

- **read-back**: the folder the engine loaded is read again (:func:`read_peft_dir`) and its
  :func:`adapter_checksum` -- tensors AND config -- must equal the learner's;
- **log-probs**: the engine's prompt log-probs of the probe tokens under the new adapter must equal
  the learner's within :data:`LOGPROB_ATOL` (fp32), which catches what a checksum of files cannot:
  vLLM serving another adapter (a reused adapter id is served from its cache, the new folder
  unread) or applying another scaling. An engine whose probe log-probs did not move while the
  learner's did fails with its own message (:func:`delivery_verdict`).

Pure torch + safetensors + json: no Ray, no vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ray_rlhf.sync.checksum import state_dict_checksum, tensor_bytes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

LOGPROB_ATOL = 1e-4
"""Largest |engine - learner| log-prob of a probe token accepted after an adapter sync: the fp32
tolerance the sync tests use for sampler vs learner log-probs (measured here: ~1e-6)."""

PROBE_TOKENS = 16
"""Length of the probe sequence (its first token has no log-prob: 15 are compared)."""

def probe_token_ids(vocab_size: int, n: int = PROBE_TOKENS) -> tuple[int, ...]:
    """Fixed token ids of the delivery probe: ``(7 i + 3) mod vocab`` -- spread over the vocabulary,
    the same on the learner and every generator, no tokenizer needed."""
    return tuple((7 * i + 3) % vocab_size for i in range(n))


@dataclass(frozen=True)
class AdapterPayload:
    """One version of the policy's adapters, as the learner sends it."""

    tensors: dict[str, torch.Tensor]
    """``peft``'s adapter state dict (adapter name removed), CPU tensors: for each adapted module
    ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r)."""
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    """Last name parts of the adapted modules (e.g. ``q_proj``), as ``adapter_config.json`` lists them."""
    probe_ids: tuple[int, ...] = ()
    """Token ids of the probe sequence (:func:`probe_token_ids`)."""
    probe_logprobs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """The learner's adapted policy's log-prob of each probe token after the first, given the ones
    before it (temperature 1, float32). Shape: (len(probe_ids) - 1,)."""

    @property
    def scaling(self) -> float:
        """alpha / r: the factor of ``B A`` (Hu et al. 2021, eq. 3)."""
        return self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter tensors (what a sync moves; the probe is 60 bytes)."""
        return tensor_bytes(self.tensors)

    def peft_config(self) -> dict:
        """The ``adapter_config.json`` of these adapters (the fields vLLM's ``PEFTHelper`` reads)."""
        return peft_config(self.rank, self.alpha, self.target_modules)

    def checksum(self) -> str:
        """:func:`adapter_checksum` of the tensors and config (the probe is not part of it)."""
        return adapter_checksum(self.tensors, self.peft_config())


def peft_config(rank: int, alpha: float, target_modules: tuple[str, ...] | list[str]) -> dict:
    """A PEFT LoRA ``adapter_config.json`` (no dropout: the engine does not train; no bias, no rsLoRA/DoRA)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
            "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None}


def adapter_checksum(tensors: dict[str, torch.Tensor], config: dict) -> str:
    """XXH3-128 over the tensors (:func:`~ray_rlhf.sync.checksum.state_dict_checksum`) and the
    config fields that change what the engine computes (r, lora_alpha, target_modules): equal iff
    the same adapters with the same scaling."""
    cfg = {"r": int(config["r"]), "lora_alpha": float(config["lora_alpha"]),
           "target_modules": sorted(config["target_modules"])}
    return state_dict_checksum({**tensors, f"config|{json.dumps(cfg, sort_keys=True)}": torch.zeros(0)})


def write_peft_dir(payload: AdapterPayload, directory: str | Path, config: dict | None = None) -> Path:
    """Write ``payload`` as a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
    into ``directory`` (created); ``config`` overrides :meth:`AdapterPayload.peft_config`. Returns it."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in payload.tensors.items()}, str(d / WEIGHTS_FILE))
    (d / CONFIG_FILE).write_text(json.dumps(config if config is not None else payload.peft_config(), indent=1))
    return d


def read_peft_dir(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a PEFT adapter folder: what an engine loading it gets."""
    from safetensors.torch import load_file

    d = Path(directory)
    return load_file(str(d / WEIGHTS_FILE)), json.loads((d / CONFIG_FILE).read_text())


@dataclass(frozen=True)
class ProbeCheck:
    """The log-prob half of an adapter sync's verification (on one generator)."""

    max_diff: float
    """max |engine - learner| probe log-prob under the new adapter."""
    unchanged: bool
    """The learner's probe log-probs moved since the last version but the engine's did not (bitwise)."""


def probe_check(engine: torch.Tensor, learner: torch.Tensor, prev_engine: torch.Tensor | None,
                prev_learner: torch.Tensor | None) -> ProbeCheck:
    """Compare the engine's probe log-probs with the learner's (and with the previous version's).
    Shapes: (T - 1,) each. ``unchanged``: the learner's moved by more than :data:`LOGPROB_ATOL` and
    the engine's equal the previous version's exactly."""
    diff = float((engine.float() - learner.float()).abs().max()) if learner.numel() else float("inf")
    unchanged = (prev_engine is not None and prev_learner is not None
                 and float((learner.float() - prev_learner.float()).abs().max()) > LOGPROB_ATOL
                 and torch.equal(engine, prev_engine))
    return ProbeCheck(diff, unchanged)
