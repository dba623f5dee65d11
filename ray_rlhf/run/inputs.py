"""A run's inputs, loaded before Ray starts: the policy directory, the tokenized prompts, where
checkpoints go, and the checkpoint to resume from.

:func:`load_inputs` is the driver's first call. It loads each input in the order a user fixes
them and runs :mod:`ray_rlhf.preflight`'s checks between the loads, so each mistake is one
:class:`~ray_rlhf.errors.UserError` before Ray, vLLM or an actor starts. The checks take the
config or what was loaded here (``preflight`` is a layer below ``run/`` and never imports it);
the benchmarks load the same policy and prompts with :func:`resolve_policy_path`,
:func:`load_tokenizer` and :func:`load_prompt_items`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_rlhf import checkpoint, preflight
from ray_rlhf.config.schema import RunConfig
from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """Everything a run needs that was checked before Ray starts."""

    policy_path: Path
    prompts: list[PromptItem]
    store_uri: str
    """Where checkpoints are (``checkpoint.location`` or ``output_dir``)."""
    resume: Any
    """The :class:`~ray_rlhf.checkpoint.Checkpoint` to resume from, or None for a fresh run."""
    resume_state: dict | None
    """That checkpoint's driver state."""


def load_inputs(cfg: RunConfig) -> RunInputs:
    """Load and check every input of a run, in the order a user fixes them; no Ray, no vLLM."""
    preflight.check_placement(cfg)
    preflight.check_local_capacity(cfg)
    preflight.check_compiler(cfg)
    preflight.check_preload(cfg)
    policy_path = resolve_policy_path(cfg)
    preflight.check_memory_budget(cfg, policy_path)
    preflight.check_packing(cfg, policy_path)
    preflight.check_lora(cfg, policy_path)
    preflight.check_adapter_sync(cfg, policy_path)
    prompts = load_prompt_items(cfg, load_tokenizer(policy_path))
    preflight.check_reward(cfg, prompts)
    preflight.check_env(cfg, prompts)
    checkpoint.check_writable(cfg.output_dir)  # metrics, rollouts and the config are written there
    store = checkpoint.open_store(checkpoint.location(cfg))
    store.check_writable()
    resume, state = load_resume(cfg, store, policy_path)
    return RunInputs(policy_path, prompts, store.uri, resume, state)


def resolve_policy_path(cfg: RunConfig) -> Path:
    """The policy directory: ``model.policy_path`` (checked by
    :func:`~ray_rlhf.preflight.check_causal_lm_dir`), or the offline preset built once into the cache."""
    if cfg.model.policy_path:
        return preflight.check_causal_lm_dir(cfg.model.policy_path, "model.policy_path")
    from ray_rlhf.models.factory import ensure_model

    return Path(ensure_model("policy", cfg.model.preset, cfg.model.cache_dir, seed=cfg.model.init_seed))


def load_tokenizer(policy_path: Path):
    """The policy's tokenizer (cheap; used to tokenize the prompts and check their lengths)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(policy_path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {policy_path} ({e}); the model directory needs its tokenizer files") from None


def prompts_path(cfg: RunConfig) -> Path:
    """``data.prompts_path``, with ``bundled:<name>`` (and empty) resolved to a bundled file."""
    from ray_rlhf.data.prompts import bundled_path

    spec = cfg.data.prompts_path or "bundled:prompts"
    return bundled_path(spec.removeprefix("bundled:")) if spec.startswith("bundled:") else Path(spec)


def load_prompt_items(cfg: RunConfig, tokenizer) -> list[PromptItem]:
    """Load the prompt file (text or chat messages, plus its other columns), render and tokenize
    every prompt once and check its length (see :func:`~ray_rlhf.data.prompts.tokenize_prompts`; with an
    ``env.name`` that declares ``tools``, the chat template gets them as ``tools=``);
    then check there are enough prompts for a step (:func:`~ray_rlhf.preflight.check_prompt_count`)."""
    from ray_rlhf.data.prompts import load_prompt_table, tokenize_prompts
    from ray_rlhf.envs.base import env_tools

    d = cfg.data
    path = prompts_path(cfg)
    table = load_prompt_table(path, column=d.prompt_column)
    tools = env_tools(cfg.env.name) if cfg.env.name else None  # a ToolEnv's tools, shown by the chat template
    items = tokenize_prompts(table.prompts, tokenizer, d.max_prompt_tokens, source=str(path), columns=table.columns,
                             chat_template=d.chat_template, system_prompt=d.system_prompt, tools=tools)
    preflight.check_prompt_count(cfg, items, path)
    return items


def load_resume(cfg: RunConfig, store, policy_path: Path) -> tuple[Any, dict | None]:
    """The checkpoint to resume from (``checkpoint.resume``) and its driver state, or ``(None, None)``
    for a fresh run; a warning names the config keys that changed since that checkpoint."""
    resume = checkpoint.find_resume(store, cfg.checkpoint.resume)
    if not resume:
        return resume, None
    state = checkpoint.read_state(store, resume, policy_path)
    changed = checkpoint.config_changes(state.get("config"), cfg.model_dump(mode="json"))
    if changed:
        log.warning("resuming %s with a changed config (%s): the run will differ from the one it continues",
                    resume.path, ", ".join(changed))
    return resume, state
