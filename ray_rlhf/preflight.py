"""Checks of the user's input that run before anything expensive (Ray, vLLM, model loading).

Each failure is a one-line :class:`~ray_rlhf.errors.UserError` naming the thing and the fix. The
checks take the config, or what :mod:`ray_rlhf.run.inputs` loaded (the prompts); that module loads
a run's inputs and calls them in order (this module sits below ``run/`` and loads nothing itself).
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_rlhf import budget
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
                             columns, sources["env_rewards"])
    for _, _, source in resolved:
        if isinstance(source, RemoteReward):
            source.check_reachable()
    if sources["functions"]:  # the functions only: no reward model weights, no remote request
        probe = RewardScorer(sources["functions"], columns=columns)
        if prompts:
            probe.validate(prompt=prompts[0].text, columns=dict(prompts[0].columns))
        else:
            probe.validate()


def check_env(cfg: RunConfig, prompts: list[PromptItem]) -> None:
    """Multi-turn runs (``env.name``; ``env.agent``: import the agent function and check it takes
    ``(client, row, **env.kwargs)``): import the environment class, build one with ``env.kwargs``,
    check its tool schemas, and probe it once -- ``reset`` with the first prompt's row, ``step`` with a
    short reply -- so that a class that cannot be imported or a ``step`` that answers in the wrong
    shape is one line before Ray and vLLM start (an exception or a time-out in the probe is left to
    the run, where it ends only that trajectory). Also: ``rollout.max_total_tokens`` must exceed
    the longest prompt."""
    import asyncio

    from ray_rlhf.envs.base import check_step, check_tools, load_agent, load_env_class
    from ray_rlhf.generation.trajectory import call_env

    e, r = cfg.env, cfg.rollout
    if not e.multi_turn:
        return
    longest = max((len(p.prompt_ids) for p in prompts), default=0)
    if r.max_total_tokens is not None and r.max_total_tokens <= longest:
        raise UserError(f"rollout.max_total_tokens={r.max_total_tokens} leaves no room for a turn after the longest "
                        f"prompt ({longest} tokens); raise it above {longest}")
    if e.agent:
        load_agent(e.agent, e.kwargs)
        return
    cls = load_env_class(e.name)
    try:
        env = cls(**e.kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        raise UserError(f"env.name={e.name}: constructing it with env.kwargs={e.kwargs} failed "
                        f"({type(exc).__name__}: {exc}); fix env.kwargs") from None
    check_tools(getattr(env, "tools", None) or [], e.name)
    row = {**dict(prompts[0].columns), "prompt_index": prompts[0].index} if prompts else {}

    async def probe():
        await call_env(env.reset, row, e.step_timeout_s)
        return await call_env(env.step, "Hello.", e.step_timeout_s)

    try:
        result = asyncio.run(probe())
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - raising or hanging is a run-time fault, not a config error
        return
    check_step(env, result)


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
    g, lc, rc, e = cfg.generators, cfg.learner, cfg.reward, cfg.env
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    env_cpus = g.num * e.num_actors * e.num_cpus if e.name and e.num_cpus else 0.0  # environment actors
    need = g.num * g.num_cpus + lc.num * lc.num_cpus + rc.num_cpus + env_cpus
    if need > cpus + 1e-9:
        envs = f" + env actors {g.num} x {e.num_actors} x {e.num_cpus:g}" if env_cpus else ""
        raise UserError(
            f"the actors need {need:g} CPUs (generators.num={g.num} x {g.num_cpus:g} + learner.num={lc.num} x "
            f"{lc.num_cpus:g} + reward {rc.num_cpus:g}{envs}) but this local Ray has {cpus}; lower generators.num or "
            "the num_cpus shares, raise ray.num_cpus, or join a cluster (ray.address / RAY_ADDRESS)"
        )
    gpus_needed = g.num * g.num_gpus + lc.num * lc.num_gpus + rc.num_gpus
    if gpus_needed:
        have = local_gpus(cfg)
        if gpus_needed > have + 1e-9:
            raise UserError(f"the actors need {gpus_needed:g} GPUs but this local Ray has {have}; lower the num_gpus "
                            "settings, declare logical GPUs with ray.num_gpus, or join a GPU cluster "
                            "(ray.address / RAY_ADDRESS)")


def local_gpus(cfg: RunConfig) -> int:
    """GPUs of a local Ray: ``ray.num_gpus`` when set (logical GPUs allowed), else the CUDA devices."""
    if cfg.ray.num_gpus is not None:
        return cfg.ray.num_gpus
    import torch

    return torch.cuda.device_count()


def check_placement(cfg: RunConfig) -> None:
    """``placement=colocated``: generator ``i`` and learner rank ``i`` share bundle ``i`` (one GPU), so
    the two counts must pair up, both must fit one GPU, and the pool cannot be elastic or overlap
    generation with training (the engines sleep while the learner trains)."""
    if cfg.placement != "colocated":
        return
    g, lc = cfg.generators, cfg.learner
    fix = "or use placement=split"
    if g.num != lc.num:
        raise UserError(f"placement=colocated pairs generator i with learner rank i on GPU i, but generators.num={g.num} "
                        f"and learner.num={lc.num} cannot pair up; set both to the number of GPUs to use {fix}")
    if cfg.pool_min != g.num or cfg.pool_max != g.num:
        raise UserError(f"placement=colocated keeps one generator per learner rank: generators.min/max "
                        f"({cfg.pool_min}/{cfg.pool_max}) must equal generators.num={g.num}; unset them {fix}")
    if g.tensor_parallel_size != 1:
        raise UserError(f"placement=colocated puts one engine on each learner rank's GPU: generators.tensor_parallel_size="
                        f"{g.tensor_parallel_size} spans several GPUs; set it to 1 {fix}")
    if (g.num_gpus > 0) != (lc.num_gpus > 0):
        raise UserError(f"placement=colocated shares each GPU between a generator and a learner rank: "
                        f"generators.num_gpus={g.num_gpus:g} and learner.num_gpus={lc.num_gpus:g} must both be "
                        f"fractions of it (e.g. 0.5 and 0.5) or both 0 (CPU) {fix}")
    if g.num_gpus + lc.num_gpus > 1 + 1e-9:
        raise UserError(f"placement=colocated shares one GPU per pair: generators.num_gpus + learner.num_gpus = "
                        f"{g.num_gpus + lc.num_gpus:g} > 1; use fractions such as 0.5 and 0.5 {fix}")
    if g.num_gpus and cfg.sync.backend == "collective":
        raise UserError("placement=colocated with sync.backend=collective would put learner rank 0 and generator 0 in "
                        "one NCCL group on the same GPU, which NCCL refuses; set sync.backend=object_store "
                        f"{fix}")
    if cfg.rollout.max_staleness:
        raise UserError(f"placement=colocated alternates generation and training on the same GPUs: "
                        f"rollout.max_staleness={cfg.rollout.max_staleness} would overlap them; set it to 0 {fix}")


def model_size(path: str | Path) -> tuple[int, dict]:
    """(parameters, text config) of a Hugging Face model directory: the parameter count summed from
    the safetensors headers (no tensor is read), the config from ``config.json``."""
    import struct

    p = Path(path)
    params = 0
    for f in sorted(p.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for d in meta["shape"]:
                    count *= int(d)
                params += count
    cfg = json.loads((p / "config.json").read_text())
    return params, cfg.get("text_config") or cfg


def gpu_memory_bytes(cfg: RunConfig) -> float | None:
    """One GPU's memory: ``ray.gpu_memory_gib``, else the local GPU's when torch sees one, else None."""
    if cfg.ray.gpu_memory_gib is not None:
        return cfg.ray.gpu_memory_gib * budget.GIB
    if joins_cluster(cfg):
        return None
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def colocated_budget(cfg: RunConfig, policy_path: str | Path, gpu_bytes: float) -> budget.GpuBudget:
    """The :class:`~ray_rlhf.budget.GpuBudget` of one GPU of this run (the policy's files give the
    parameters and shapes; a separate critic counts as parameters too)."""
    g, lc = cfg.generators, cfg.learner
    params, text = model_size(policy_path)
    learner_params = params + (model_size(cfg.model.critic_path)[0] if cfg.model.critic_path else 0)
    tokens = cfg.ppo.micro_batch_size * (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    if cfg.ppo.micro_batch_tokens:
        tokens = min(tokens, cfg.ppo.micro_batch_tokens)
    acts = budget.activation_bytes(
        tokens, hidden=int(text.get("hidden_size") or text.get("n_embd") or 0),
        layers=int(text.get("num_hidden_layers") or text.get("n_layer") or 0), vocab=int(text.get("vocab_size") or 0),
        compute_bytes=2 if lc.dtype == "bfloat16" else 4, checkpointing=lc.gradient_checkpointing)
    learner = budget.learner_memory(learner_params, ranks=lc.num, fsdp=lc.strategy == "fsdp",
                                    shard_reference=lc.shard_reference, activations=acts)
    return budget.GpuBudget(gpu=gpu_bytes, learner=learner, engine_share=g.gpu_memory_utilization * gpu_bytes,
                            engine_weights=budget.MASTER_BYTES * params)  # the engines run float32


def check_memory_budget(cfg: RunConfig, policy_path: str | Path) -> None:
    """``placement=colocated`` on GPUs: an engine and a learner rank must fit one GPU in both phases
    (:mod:`ray_rlhf.budget`); else one line with the budget. Skipped on CPU (no GPU shares) and
    when the GPU's memory is unknown (``ray.gpu_memory_gib`` empty and no local GPU)."""
    if cfg.placement != "colocated" or not cfg.generators.num_gpus:
        return
    gpu_bytes = gpu_memory_bytes(cfg)
    if gpu_bytes is None:
        return
    b = colocated_budget(cfg, policy_path, gpu_bytes)
    if not b.fits:
        raise UserError(f"placement=colocated does not fit: {b.line()}; lower generators.gpu_memory_utilization, "
                        "shard the learner (learner.strategy=fsdp, learner.shard_reference=true), turn on "
                        "learner.gradient_checkpointing or lower ppo.micro_batch_size, or use placement=split")


def check_packing(cfg: RunConfig, policy_path: str | Path) -> None:
    """``ppo.packing=on`` needs attention confined per sequence: the probe
    (:mod:`ray_rlhf.models.packing_probe`, a one-layer model of the checkpoint's config) must pass."""
    if cfg.ppo.packing != "on":
        return
    from ray_rlhf.models.packing_probe import probe_checkpoint

    why = probe_checkpoint(str(policy_path))
    if why is not None:
        raise UserError(f"ppo.packing=on: this model's attention cannot be confined per packed sequence ({why}); "
                        "set ppo.packing=off or ppo.packing=auto")


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


def check_lora(cfg: RunConfig, policy_path: str | Path) -> None:
    """``lora.target_modules`` must each match a linear module of the policy's decoder trunk: the
    model is built from its config on the meta device (no weights) and the names resolved as the
    learner resolves them (:func:`ray_rlhf.learning.lora.resolve_targets`)."""
    if cfg.lora.rank:
        check_lora_targets(policy_path, cfg.lora.target_modules)


def check_lora_targets(policy_path: str | Path, targets) -> None:
    """Each of ``targets`` (None: all) matches a linear module of the causal LM at ``policy_path``,
    resolved on the meta device (no weights) as the learner resolves them; else one line naming the
    model's linear modules (also the SFT and DPO stages' check)."""
    if targets is None:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ray_rlhf.learning.lora import resolve_targets

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(policy_path)))
    try:
        resolve_targets(lm, targets)
    except ValueError as e:
        raise UserError(f"{e}; set lora.target_modules to some of them, or leave it empty for all") from None


def vllm_serves_lora(architecture: str) -> bool | None:
    """Whether vLLM's model class for ``architecture`` (a ``config.json`` ``architectures`` entry)
    implements ``SupportsLoRA``, read from vLLM's source without importing it (``import vllm`` takes
    seconds): the registry's ``"Arch": ("module", "Class")`` entry, then the class's bases, following
    a base defined in the same module or imported from another model module. None: unknown (vLLM not
    installed, or its source not laid out this way): the engine decides at start."""
    import ast
    import importlib.util
    import re

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    models = Path(spec.submodule_search_locations[0]) / "model_executor" / "models"
    try:
        registry = (models / "registry.py").read_text()
    except OSError:
        return None
    entry = re.search(rf'^\s*"{re.escape(architecture)}": \("(\w+)", "(\w+)"\)', registry, re.M)
    if entry is None:
        return None
    module, cls = entry.groups()
    for _ in range(4):  # a few levels of inheritance (Phi3ForCausalLM -> LlamaForCausalLM)
        try:
            tree = ast.parse((models / f"{module}.py").read_text())
        except (OSError, SyntaxError):
            return None
        node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if node is None:
            return None
        bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
        if "SupportsLoRA" in bases:
            return True
        imported = {a.asname or a.name: n.module.rsplit(".", 1)[-1] for n in tree.body
                    if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
        local = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        nxt = next((b for b in bases if b.endswith("ForCausalLM") or b.endswith("LMHeadModel")), None)
        if nxt is None:
            return False
        module = module if nxt in local else imported.get(nxt)
        if module is None:
            return None
        cls = nxt
    return None


def check_adapter_sync(cfg: RunConfig, policy_path: str | Path) -> None:
    """``lora.sync=adapter`` needs an engine that serves LoRA for the policy's architecture
    (:func:`vllm_serves_lora`); refused with one line where vLLM's model class has no LoRA support."""
    if cfg.engine_max_lora_rank is None:
        return
    try:
        archs = json.loads(Path(policy_path, "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return
    for arch in archs:
        if vllm_serves_lora(arch) is False:
            raise UserError(f"lora.sync=adapter: vLLM cannot serve LoRA adapters for {arch} (its model class does not "
                            f"implement SupportsLoRA); set lora.sync=merged (the learner merges the adapters and "
                            "syncs full weights)")
