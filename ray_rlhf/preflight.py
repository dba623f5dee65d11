"""Checks of the user's input that run before anything expensive (Ray, vLLM, model loading).

Each failure is a one-line :class:`~ray_rlhf.errors.UserError` naming the thing and the fix. The
checks take the config, or what :mod:`ray_rlhf.run.inputs` loaded (the prompts); that module loads
a run's inputs and calls them in order (this module sits below ``run/`` and loads nothing itself).
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem
from ray_rlhf.rewards.sources import reward_sources


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


def check_prompt_count(cfg: RunConfig, prompts: list[PromptItem], source: str | Path) -> None:
    """A step draws ``rollout.prompts_per_step`` distinct prompts: the file ``source`` must hold as many."""
    if cfg.rollout.prompts_per_step > len(prompts):
        raise UserError(
            f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} exceeds the {len(prompts)} prompts in {source}"
        )


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
