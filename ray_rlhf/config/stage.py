"""The typed config tree of the pipeline stages ``ray-rlhf sft|rm|dpo`` (one tree, a section per
concern, a ``dpo`` section for the stage that has knobs of its own).

Loaded like a PPO run's: a preset (``--config tiny``, the default) or a YAML file, then dotted
``key=value`` overrides (``optim.lr=5e-4``, ``dpo.beta=0.2``). The flat names of 0.2
(``model_path``, ``out``, ``lr``, ``beta`` ...) stay accepted as aliases (:data:`FLAT_ALIASES`).
Every mistake is one line (:class:`~ray_rlhf.errors.UserError`) before a model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ray_rlhf.config.base import _Section
from ray_rlhf.errors import UserError

STAGES = ("sft", "rm", "dpo")
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "bundled"
BUNDLED_DATA = {"sft": BUNDLED / "sft_letters.jsonl", "rm": BUNDLED / "prefs_letters.jsonl",
                "dpo": BUNDLED / "prefs_letters.jsonl"}
"""The stage's data when ``data.path`` is empty: the bundled files for the tiny model's task."""


class StageModel(_Section):
    path: str | None = None
    """Hugging Face directory of the model to train (``model_path`` is its alias). Empty: build the
    offline ``preset`` model (random init) into ``cache_dir`` once and use it."""
    preset: str = "tiny"
    """Offline model preset used when ``path`` is empty (see ``ray-rlhf make-model``)."""
    init_seed: int = Field(0, ge=0)
    """Seed of the offline model's random init."""
    cache_dir: str = "runs/models"
    """Where offline models are built (once) and reused."""


class StageData(_Section):
    path: str | None = None
    """JSON Lines or Parquet file (``data.prompts_path`` is its alias). SFT rows: ``prompt`` +
    ``response`` or ``messages``; RM/DPO rows: ``prompt``, ``chosen``, ``rejected`` (optional
    ``margin``). Empty: the bundled file of the stage (:data:`BUNDLED_DATA`)."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Hold out this fraction of the rows (a seeded draw, at least one row) for evaluation; 0 =
    no held-out split from the training file."""
    eval_path: str | None = None
    """A separate evaluation file of the same format (takes precedence over ``eval_fraction``)."""
    max_tokens: int = Field(128, ge=2)
    """Prompt and completion are each cut to this many tokens."""


class StageOptim(_Section):
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    batch_size: int = Field(16, ge=1)
    """Examples (SFT rows or preference pairs) per optimizer step."""
    micro_batch_size: int = Field(16, ge=1)
    """Examples per forward/backward pass (gradient accumulation up to ``batch_size``)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""


class StageEval(_Section):
    every: int = Field(10, ge=1)
    """Evaluate the held-out rows after the first step, every this many steps and after the last
    (``eval/<metric>`` in that step's metrics)."""


class StageCheckpoint(_Section):
    every: int = Field(10, ge=1)
    """Save ``output_dir/checkpoint.pt`` every this many steps (and at the last step or a SIGTERM)."""


class StageLearner(_Section):
    num: int = Field(1, ge=1)
    """Learner ranks (DDP over gloo on CPU): 1 runs in the command's own process; more start that
    many Ray actors (a local Ray, or the cluster of ``RAY_ADDRESS`` under ``ray job submit``) that
    split every batch between them and sum their gradients -- the same update as one rank. Rank 0
    writes ``output_dir`` (a path every rank can read, to resume on several nodes)."""
    num_cpus: float = Field(1.0, gt=0)
    """Ray CPUs reserved per rank (``learner.num > 1``); each rank runs that many torch threads."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How several ranks hold the model: ``ddp`` (each a full copy, gradients summed) or ``fsdp``
    (FSDP2: parameters, gradients and AdamW state sharded over the ranks; the checkpoint and the
    final model are gathered whole by every rank and written by rank 0). One rank: no difference."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where each rank trains: ``cuda`` puts each rank on a GPU of its own (one GPU reserved per rank
    with ``learner.num > 1``; NCCL between ranks); refused with one line where no GPU is visible."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: ``bfloat16`` runs forward and backward under bf16 autocast (FSDP2: bf16
    parameters in compute, float32 gradient reduction); weights, gradients and AdamW stay float32."""


class StageLora(_Section):
    rank: int = Field(0, ge=0)
    """LoRA rank of the policy's adapters for ``sft`` and ``dpo`` (0 = off: full fine-tuning). With a
    rank the trunk is frozen and only the adapters train (``peft``, as ``ray-rlhf train``'s
    ``lora.*``); DPO's reference is the same model with the adapters off (no second copy). The final
    ``model/`` is the merged model (it loads anywhere), ``adapter/`` the adapters alone."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha: the adapters' update is scaled by alpha / rank."""
    target_modules: list[str] | None = None
    """Names (or suffixes) of the adapted linear modules; empty: every linear layer of the decoder
    trunk. One matching none of the model's is refused before the model loads, naming them."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input while training (0: off)."""


class DPOSection(_Section):
    beta: float = Field(0.1, gt=0)
    """DPO's KL strength (> 0; 0.1 is usual)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid`` (DPO, with ``label_smoothing`` = cDPO) or ``ipo``."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """cDPO's label-noise rate eps (0 = plain DPO)."""


class StageConfig(_Section):
    stage: Literal["sft", "rm", "dpo"] = "sft"
    """Set by the command (``ray-rlhf sft`` ...), not by a key."""
    seed: int = Field(0, ge=0)
    """Seeds the data order, the held-out draw and the model's dropout."""
    steps: int = Field(30, ge=1)
    """Optimizer steps."""
    output_dir: str = ""
    """Where ``checkpoint.pt``, ``metrics.jsonl`` and the final ``model/`` go (``out`` is its alias).
    Empty: ``runs/<stage>``."""
    model: StageModel = Field(default_factory=StageModel)
    data: StageData = Field(default_factory=StageData)
    optim: StageOptim = Field(default_factory=StageOptim)
    eval: StageEval = Field(default_factory=StageEval)
    checkpoint: StageCheckpoint = Field(default_factory=StageCheckpoint)
    learner: StageLearner = Field(default_factory=StageLearner)
    dpo: DPOSection = Field(default_factory=DPOSection)
    lora: StageLora = Field(default_factory=StageLora)

    @model_validator(mode="after")
    def _check_lora(self) -> StageConfig:
        if self.lora.rank and self.stage == "rm":
            raise ValueError("lora.rank > 0 is not supported for rm yet (the score head and peft's sequence "
                             "classification are not wired); train the reward model fully (lora.rank=0)")
        if self.lora.rank and self.learner.strategy == "fsdp" and self.learner.num > 1:
            raise ValueError("lora.rank > 0 with learner.strategy=fsdp is not supported for the stages yet; "
                             "use learner.strategy=ddp (LoRA's trainable state is small)")
        return self


FLAT_ALIASES = {
    "model_path": "model.path", "data_path": "data.path", "data.prompts_path": "data.path", "out": "output_dir",
    "lr": "optim.lr", "batch_size": "optim.batch_size", "micro_batch_size": "optim.micro_batch_size",
    "checkpoint_every": "checkpoint.every", "eval_every": "eval.every", "max_tokens": "data.max_tokens",
    "eval_fraction": "data.eval_fraction", "eval_path": "data.eval_path", "beta": "dpo.beta", "loss": "dpo.loss",
    "label_smoothing": "dpo.label_smoothing",
}
"""0.2's flat stage options (and PPO's ``data.prompts_path``), accepted as other names of their keys."""

PRESETS = {"tiny": {}}
"""Stage presets: ``tiny`` is the defaults (the offline tiny model and the bundled data)."""


def _keys(model=StageConfig, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, _Section):
            out += _keys(sub, f"{prefix}{name}.")
        elif name != "stage":
            out.append(prefix + name)
    return out


def load_stage_config(stage: str, config: str | None, overrides: list[str]) -> StageConfig:
    """``config`` (a preset name or a YAML file; None = ``tiny``) plus ``key=value`` overrides,
    validated; one line per mistake."""
    if config is None or config in PRESETS:
        tree = dict(PRESETS[config or "tiny"])
    elif Path(config).suffix in (".yaml", ".yml") and Path(config).is_file():
        try:
            tree = yaml.safe_load(Path(config).read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {config} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise UserError(f"config file {config} must hold a mapping of keys")
    else:
        raise UserError(f"--config {config!r} is neither a stage preset ({', '.join(PRESETS)}) nor an existing YAML file")
    valid = _keys()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = FLAT_ALIASES.get(key.strip(), key.strip())
        if not sep or key not in valid:
            raise UserError(f"unknown {stage} option {item!r}; write key=value with a key among: "
                            f"{', '.join(valid)} (or 0.2's {', '.join(a for a in FLAT_ALIASES if '.' not in a)})")
        node = tree
        *sections, leaf = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{config}: {part!r} must be a section (a mapping of keys)")
        try:
            node[leaf] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            node[leaf] = value
    tree["stage"] = stage
    try:
        cfg = StageConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{stage} option {key}={err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}") from None
    return cfg
