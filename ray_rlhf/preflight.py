"""Checks of the user's input that run before anything expensive (Ray, vLLM, model loading).

Each failure is a one-line :class:`~ray_rlhf.errors.UserError` naming the thing and the fix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem

log = logging.getLogger(__name__)


def check_causal_lm_dir(path: str | Path, key: str) -> Path:
    """``path`` must be a Hugging Face directory holding a causal LM."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{key}={path}: no such directory; point it at a Hugging Face model directory")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{key}={path}: no config.json, so not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise UserError(f"{key}={path}: config.json is not valid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise UserError(
            f"{key}={path} holds {', '.join(archs) or 'no architecture'}, not a causal LM "
            "(need an *ForCausalLM checkpoint)"
        )
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UserError(f"{key}={path}: no weight files (*.safetensors) in the directory")
    return p


def resolve_policy_path(cfg: RunConfig) -> Path:
    """The policy directory: ``model.policy_path``, or the offline preset built once into the cache."""
    if cfg.model.policy_path:
        return check_causal_lm_dir(cfg.model.policy_path, "model.policy_path")
    from ray_rlhf.models.factory import ensure_model

    return Path(ensure_model("policy", cfg.model.preset, cfg.model.cache_dir, seed=cfg.model.init_seed))


def load_and_check_prompts(cfg: RunConfig, tokenizer) -> list[PromptItem]:
    """Load the prompt file, tokenize every prompt once and check its length (see
    :func:`~ray_rlhf.data.prompts.tokenize_prompts`)."""
    from ray_rlhf.data.prompts import bundled_prompts_path, load_prompts, tokenize_prompts

    path = cfg.data.prompts_path or bundled_prompts_path()
    prompts = load_prompts(path, column=cfg.data.prompt_column)
    items = tokenize_prompts(prompts, tokenizer, cfg.data.max_prompt_tokens, source=str(path))
    if cfg.rollout.prompts_per_step > len(items):
        raise UserError(
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} exceeds the {len(items)} prompts in {path}"
        )
    return items


def load_tokenizer(policy_path: Path):
    """The policy's tokenizer (cheap; used to check prompt lengths)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(policy_path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {policy_path} ({e}); the model directory needs its tokenizer files") from None


def check_reward(cfg: RunConfig, prompts: list[PromptItem] | None = None) -> None:
    """Import every reward function and read the reward model's config, before any actor starts;
    then call each function once on a probe sample (the first prompt and a short plain response).

    The probe catches a function that raises or returns NaN / a non-number on ordinary text in the
    driver, in a second, instead of in the reward actor after Ray and vLLM have started. (A function
    that fails only on some generated text still fails at its step, with the same one-line message.)
    """
    from ray_rlhf.rewards.scorer import RewardScorer, check_sources

    functions = [(f.name, f.weight) for f in cfg.reward.functions]
    check_sources(functions, cfg.reward.model_path, cfg.reward.model_weight)
    if functions:  # the functions only: the reward model's weights are not loaded here
        probe = RewardScorer(functions)
        if prompts:
            probe.validate(prompt=prompts[0].text)
        else:
            probe.validate()


@dataclass
class RunInputs:
    """Everything a run needs that was checked before Ray starts."""

    policy_path: Path
    prompts: list[PromptItem]
    resume_dir: Path | None
    """The checkpoint to resume from, or None for a fresh run."""
    resume_state: dict | None
    """That checkpoint's driver state."""


def check_run(cfg: RunConfig) -> RunInputs:
    """Every cheap check of a run's input, in the order a user fixes them; no Ray, no vLLM."""
    from ray_rlhf import checkpoint

    policy_path = resolve_policy_path(cfg)
    prompts = load_and_check_prompts(cfg, load_tokenizer(policy_path))
    check_reward(cfg, prompts)
    checkpoint.check_writable(cfg.output_dir)
    resume_dir = checkpoint.resolve_resume(cfg.output_dir, cfg.checkpoint.resume)
    state = checkpoint.validate(resume_dir) if resume_dir else None
    if resume_dir:
        checkpoint.check_compatible(resume_dir, policy_path)
        changed = checkpoint.config_changes(state.get("config"), cfg.model_dump(mode="json"))
        if changed:
            log.warning("resuming %s with a changed config (%s): the run will differ from the one it continues",
                        resume_dir, ", ".join(changed))
    return RunInputs(policy_path, prompts, resume_dir, state)
