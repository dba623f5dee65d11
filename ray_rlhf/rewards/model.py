"""A Hugging Face sequence-classification reward model as a reward source.

The model reads ``prompt + response`` (the response continues the prompt), tokenized by the
model's own tokenizer with right padding (so positions match the unpadded sequence and the model
pools the last real token) and left truncation to its context (the end of the response is kept).
It runs in eval mode under ``torch.inference_mode``; its score is the scalar logit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray_rlhf.errors import UserError
from ray_rlhf.rewards.functions import RewardError

MODEL_KEY = "model"
"""The reward model's name among the sources (its key in ``RolloutBatch.reward_parts``)."""


def _excerpt(text: str, n: int = 40) -> str:
    return repr(text[:n]) + ("..." if len(text) > n else "")


def check_reward_model(path: str | Path) -> Any:
    """Check, without loading weights, that ``path`` holds a sequence-classification model with
    ``num_labels=1``; returns its ``transformers`` config. Raises :class:`UserError` otherwise."""
    p = Path(path)
    fix = "set reward.model_path to a Hugging Face sequence-classification model directory, or leave it empty"
    if not p.exists():
        raise UserError(f"reward model path '{p}' does not exist; {fix}")
    if not (p / "config.json").is_file():
        raise UserError(f"reward model path '{p}' holds no config.json (not a model saved with save_pretrained); {fix}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(p))
    except Exception as exc:
        raise UserError(f"reward model '{p}': cannot read config.json ({type(exc).__name__}: {exc}); {fix}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"reward model '{p}' is {'/'.join(archs) or 'of unknown architecture'}, not a "
                        f"*ForSequenceClassification model; {fix}")
    if config.num_labels != 1:
        raise UserError(f"reward model '{p}' has num_labels={config.num_labels}; a reward model must output one "
                        "scalar (num_labels=1)")
    return config


class ModelReward:
    """Scores ``prompt + response`` with a reward model, ``batch_size`` sequences per forward."""

    spec = MODEL_KEY

    def __init__(self, path: str, batch_size: int = 32, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_reward_model(path)
        self.path, self.batch_size, self.device = str(path), batch_size, device
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise UserError(f"reward model '{path}': cannot load its tokenizer ({type(exc).__name__}: {exc}); "
                            "save the tokenizer into the model directory (tokenizer.save_pretrained)") from exc
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError(f"reward model '{path}': its tokenizer has neither a pad nor an EOS token; "
                                "set tokenizer.pad_token and save it again")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except Exception as exc:
            raise UserError(f"reward model '{path}': cannot load weights ({type(exc).__name__}: {exc}); "
                            "point reward.model_path at a complete save_pretrained directory") from exc
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval().requires_grad_(False).to(device)
        limits = [n for n in (tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
                  if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else None
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 where: Sequence[str] | None = None) -> list[float]:
        """The scalar logit of every ``prompt + response``; a non-finite one is a :class:`RewardError`."""
        import torch

        texts = [p + r for p, r in zip(prompts, responses)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length)
            with torch.inference_mode():
                logits = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device)).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        for i, value in enumerate(out):
            if not math.isfinite(value):
                label = where[i] if where is not None else f"sample {i} of the batch"
                raise RewardError(f"reward model '{self.path}' returned {value} on {label} (response "
                                  f"{_excerpt(responses[i])}); check the model's weights", MODEL_KEY, batch_index=i)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
