"""Checks of the user's input that run before anything expensive (Ray, vLLM, model loading).

Each failure is a one-line :class:`~ray_rlhf.errors.UserError` naming the thing and the fix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem

log = logging.getLogger(__name__)


def causal_lm_classes() -> frozenset[str]:
    """The model classes the installed transformers loads as causal LMs: the values of
    ``AutoModelForCausalLM``'s mapping (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def check_causal_lm_dir(path: str | Path, key: str) -> Path:
    """``path`` must be a Hugging Face directory holding a causal LM: one of the ``architectures``
    in its ``config.json`` is a class transformers loads with ``AutoModelForCausalLM``
    (:func:`causal_lm_classes`). Going by the name alone would refuse ``GPT2LMHeadModel`` and accept
    any ``*ForCausalLM`` transformers cannot load; a sequence classifier (a reward model) is refused:
    ``AutoModelForCausalLM`` would load its trunk under a random output head."""
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
    archs = [archs] if isinstance(archs, str) else [str(a) for a in archs]
    if not set(archs) & causal_lm_classes():
        import transformers

        raise UserError(
            f"{key}={path} holds {', '.join(archs) or 'no architecture'}, not a causal LM that transformers "
            f"{transformers.__version__} loads (AutoModelForCausalLM: LlamaForCausalLM, GPT2LMHeadModel, ...); "
            "point it at a causal LM checkpoint (not a reward or classifier model), or upgrade transformers "
            "if the architecture is newer than it"
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


def prompts_path(cfg: RunConfig) -> Path:
    """``data.prompts_path``, with ``bundled:<name>`` (and empty) resolved to a bundled file."""
    from ray_rlhf.data.prompts import bundled_path

    spec = cfg.data.prompts_path or "bundled:prompts"
    return bundled_path(spec.removeprefix("bundled:")) if spec.startswith("bundled:") else Path(spec)


def load_and_check_prompts(cfg: RunConfig, tokenizer) -> list[PromptItem]:
    """Load the prompt file (text or chat messages, plus its other columns), render and tokenize
    every prompt once and check its length (see :func:`~ray_rlhf.data.prompts.tokenize_prompts`)."""
    from ray_rlhf.data.prompts import load_prompt_table, tokenize_prompts

    d = cfg.data
    path = prompts_path(cfg)
    table = load_prompt_table(path, column=d.prompt_column)
    items = tokenize_prompts(table.prompts, tokenizer, d.max_prompt_tokens, source=str(path), columns=table.columns,
                             chat_template=d.chat_template, system_prompt=d.system_prompt)
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


def reward_sources(cfg: RunConfig) -> dict:
    """The reward actor's constructor arguments (what :func:`check_reward` checks)."""
    rc = cfg.reward
    return dict(functions=[(f.name, f.weight, f.kind) for f in rc.functions], model_path=rc.model_path,
                model_weight=rc.model_weight, batch_size=rc.batch_size, remote=[r.model_dump() for r in rc.remote])


def check_reward(cfg: RunConfig, prompts: list[PromptItem] | None = None) -> None:
    """Import every reward function (checking its signature against the dataset's columns), read
    the reward model's config and reach every remote service, before any actor starts; then call
    each function once on a probe sample (the first prompt, its columns and a short plain response).

    The probe catches a function that raises or returns NaN / a non-number on ordinary text in the
    driver, in a second, instead of in the reward actor after Ray and vLLM have started. (A function
    that fails only on some generated text still fails at its step, with the same one-line message.)
    """
    from ray_rlhf.rewards.remote import RemoteReward
    from ray_rlhf.rewards.scorer import RewardScorer, check_sources

    sources = reward_sources(cfg)
    columns = list(prompts[0].columns) if prompts else []
    resolved = check_sources(sources["functions"], sources["model_path"], sources["model_weight"], sources["remote"],
                             columns)
    for _, _, source in resolved:
        if isinstance(source, RemoteReward):
            source.check_reachable()
    if sources["functions"]:  # the functions only: no reward model weights, no remote request
        probe = RewardScorer(sources["functions"], columns=columns)
        if prompts:
            probe.validate(prompt=prompts[0].text, columns=dict(prompts[0].columns))
        else:
            probe.validate()


def joins_cluster(cfg: RunConfig) -> bool:
    """True when the run joins an existing Ray cluster (``ray.address`` or ``RAY_ADDRESS``): the
    actors' nodes are not this machine, so checks of this machine do not apply."""
    import os

    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def check_local_capacity(cfg: RunConfig) -> None:
    """On a local Ray (no cluster to join, nothing can autoscale): the actors must fit its CPUs and
    GPUs, else one line now instead of a placement timeout later."""
    import os

    if joins_cluster(cfg):
        return
    g, lc, rc = cfg.generators, cfg.learner, cfg.reward
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    need = g.num * g.num_cpus + lc.num * lc.num_cpus + rc.num_cpus
    if need > cpus + 1e-9:
        raise UserError(
            f"the actors need {need:g} CPUs (generators.num={g.num} x {g.num_cpus:g} + learner.num={lc.num} x "
            f"{lc.num_cpus:g} + reward {rc.num_cpus:g}) but this local Ray has {cpus}; lower generators.num or the "
            "num_cpus shares, raise ray.num_cpus, or join a cluster (ray.address / RAY_ADDRESS)"
        )
    gpus_needed = g.num * g.num_gpus + lc.num * lc.num_gpus + rc.num_gpus
    if gpus_needed:
        import torch

        have = torch.cuda.device_count()
        if gpus_needed > have:
            raise UserError(f"the actors need {gpus_needed:g} GPUs but this machine has {have}; lower the num_gpus "
                            "settings or join a GPU cluster (ray.address / RAY_ADDRESS)")


def checkpoint_location(cfg: RunConfig) -> str:
    """``checkpoint.location``, or ``output_dir``: checkpoints go under ``<location>/checkpoints``."""
    import os

    return cfg.checkpoint.location or os.path.abspath(cfg.output_dir)


@dataclass
class RunInputs:
    """Everything a run needs that was checked before Ray starts."""

    policy_path: Path
    prompts: list[PromptItem]
    store_uri: str
    """Where checkpoints are (``checkpoint.location`` or ``output_dir``)."""
    resume: Any
    """The :class:`~ray_rlhf.storage.Checkpoint` to resume from, or None for a fresh run."""
    resume_state: dict | None
    """That checkpoint's driver state."""


def check_compiler(cfg: RunConfig) -> None:
    """``learner.compile`` on CPU: torch's inductor builds C++ kernels, so a local run needs a C++
    compiler here (on a cluster the learner's node decides; inductor's own error names it)."""
    import os
    import shutil

    lc = cfg.learner
    if not lc.compile or lc.device != "cpu" or joins_cluster(cfg):
        return
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise UserError("learner.compile=true needs a C++ compiler on CPU (torch.compile builds C++ kernels) and "
                        "none is on PATH; install g++ (e.g. apt install g++) or set learner.compile=false")


def check_preload(cfg: RunConfig) -> None:
    """``generators.preload``: on a local Ray every library must exist here (a process started with a
    missing ``LD_PRELOAD`` entry only prints a loader warning)."""
    if joins_cluster(cfg):
        return
    for lib in cfg.generators.preload:
        if not Path(lib).is_file():
            raise UserError(f"generators.preload: {lib} does not exist; give the full path of the shared library "
                            "(e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4) or leave generators.preload empty")


def check_run(cfg: RunConfig) -> RunInputs:
    """Every cheap check of a run's input, in the order a user fixes them; no Ray, no vLLM."""
    from ray_rlhf import checkpoint
    from ray_rlhf.storage import open_store

    check_local_capacity(cfg)
    check_compiler(cfg)
    check_preload(cfg)
    policy_path = resolve_policy_path(cfg)
    prompts = load_and_check_prompts(cfg, load_tokenizer(policy_path))
    check_reward(cfg, prompts)
    checkpoint.check_writable(cfg.output_dir)  # metrics, rollouts and the config are written there
    store = open_store(checkpoint_location(cfg))
    store.check_writable()
    resume = checkpoint.find_resume(store, cfg.checkpoint.resume)
    state = checkpoint.read_state(store, resume, policy_path) if resume else None
    if resume:
        changed = checkpoint.config_changes(state.get("config"), cfg.model_dump(mode="json"))
        if changed:
            log.warning("resuming %s with a changed config (%s): the run will differ from the one it continues",
                        resume.path, ", ".join(changed))
    return RunInputs(policy_path, prompts, store.uri, resume, state)
