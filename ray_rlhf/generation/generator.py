"""A rollout generator: one vLLM engine running in this process.

Plain class; the driver wraps it with ``ray.remote(num_cpus=..)(Generator)`` at launch, a test
builds it directly. vLLM is imported inside ``__init__`` so this module imports without vLLM.

Engine settings (ENV-NOTES.md): ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and
``distributed_executor_backend="uni"`` keep the engine in this process, so tensors handed to
``collective_rpc`` (weight loads, read-backs) are passed by reference, not serialised.

Token ids: prompts arrive tokenized (:attr:`PromptItem.prompt_ids`, made once when the dataset is
loaded: chat template, special tokens and the prompt-length check live there), so the engine sees
exactly the ids the learner will score.

Sampler log-probs: the engine runs with ``logprobs_mode="processed_logprobs"`` and requests
``logprobs=0``. ``logprobs=0`` returns exactly the sampled token's log-prob (``logprobs=1`` adds the
top-1 token besides it); "processed" means after temperature and top-p, i.e. the log-prob under the
distribution the token was actually drawn from (vLLM's default is the raw model distribution).
``flat_logprobs=True`` returns them as one flat list per completion, so a batch is assembled with
NumPy and no per-token Python work.

CPU thread pinning (``omp_threads_bind``): vLLM 0.32 binds OpenMP threads only in its
multiprocess executor; the in-process ``uni`` executor binds nothing (and sets torch to 1
intra-op thread unless ``OMP_NUM_THREADS`` is set; Ray sets it from the actor's ``num_cpus``).
So the default ``"nobind"`` lets the OS spread several engines over the cores -- on a 2-core box
with 2-4 engines that is what we want. A core list (``"1"``, ``"0-1"``, ``"2,3"``) pins this
whole process with ``sched_setaffinity`` (threads started afterwards, including OpenMP's,
inherit it); give each engine its own list, e.g. :func:`core_list_for`. ``"auto"`` leaves vLLM's
own setting alone.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

from ray_rlhf.envs.base import load_agent, load_env_class
from ray_rlhf.envs.remote import EnvMakers
from ray_rlhf.errors import UserError
from ray_rlhf.generation.engine_stepper import run_continuous, turns_sampler
from ray_rlhf.generation.partial import Resumable, generate_interruptible
from ray_rlhf.generation.shard import ShardReport, bind_cpus, core_list_for, request_seed, shard_batch
from ray_rlhf.generation.trajectory import (
    Sampler,
    TemplateDelta,
    TrajectoryLimits,
    run_trajectories,
)
from ray_rlhf.generation.vllm_engine import EngineSleep, VllmEngine, sleep_mode_available
from ray_rlhf.records import FINISH_REASONS, PromptShard, RolloutBatch, SamplingSpec
from ray_rlhf.sync.receiver import WeightReceiver

__all__ = ["Generator", "ShardReport", "core_list_for", "request_seed"]

log = logging.getLogger(__name__)


class Generator:
    """One vLLM engine, in-process; produces :class:`RolloutBatch` es and loads new weights.

    Args:
        model_path: Hugging Face model directory (config, safetensors, tokenizer).
        generator_id: name stamped on every rollout (diagnostics, pool bookkeeping).
        max_model_len: engine context length (``generators.max_model_len``).
        seed: engine seed (unseeded requests draw from it).
        dtype: engine weight dtype; the learner must send this dtype.
        gpu_memory_utilization: GPU memory fraction (GPU only; None: vLLM's default).
        tensor_parallel_size: >1 only on GPU clusters (uses vLLM's default executor, not in-process).
        kv_cache_gib: CPU KV cache, whole GiB (``VLLM_CPU_KVCACHE_SPACE``).
        enforce_eager: no torch.compile / CUDA graphs (fast start, what CPU wants).
        omp_threads_bind: ``"nobind"`` (default), ``"auto"`` or a core list; see module docstring.
        sleep_mode: ``placement=colocated``: the engine sleeps while the learner trains on its GPU
            (:meth:`sleep`, :meth:`wake_up`; vLLM's ``enable_sleep_mode`` where the platform has it,
            :func:`~ray_rlhf.generation.vllm_engine.sleep_mode_available`; on CPU the phases are
            enforced and recorded but no memory is released).
        env: multi-turn rollouts (``env.name`` or ``env.agent`` set): ``name`` or ``agent``, ``kwargs``,
            ``max_turns``, ``step_timeout_s``, ``max_total_tokens``, ``scheduling`` (absent: ``turns``) (plain data,
            :func:`ray_rlhf.run.actors.env_spec`); None: single-turn completions.
        max_lora_rank: ``lora.sync=adapter``: start the engine with LoRA (``enable_lora``, this
            ``max_lora_rank``, one adapter at a time); each sync's adapters are then served as a new
            adapter (:meth:`~ray_rlhf.generation.vllm_engine.VllmEngine.load_adapter`) for all later
            generation. None: no LoRA (full or merged weights are loaded instead).
        partial: ``rollout.partial``: single-turn shards run on an engine-step loop that takes
            weights delivered to its mailbox (``weights.deliver``, a concurrent actor call: launch the
            actor with ``max_concurrency=2``) at the next engine step and resumes the unfinished
            requests under them (:mod:`ray_rlhf.generation.partial`); the batch carries
            ``token_versions``.
    """

    def __init__(
        self,
        model_path: str | Path,
        generator_id: str,
        max_model_len: int,
        seed: int = 0,
        dtype: str = "float32",
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        kv_cache_gib: float = 1,
        enforce_eager: bool = True,
        omp_threads_bind: str = "nobind",
        sleep_mode: bool = False,
        env: dict | None = None,
        max_lora_rank: int | None = None,
        partial: bool = False,
    ):
        if not Path(model_path, "config.json").is_file():
            raise UserError(f"model directory {model_path} has no config.json; check model.path or build the model first")
        self.generator_id = generator_id
        self.max_model_len = int(max_model_len)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.partial = bool(partial)
        self.interruptions = 0
        """``partial``: weight loads that interrupted in-flight requests so far."""
        self.env = dict(env) if env else None
        self._env_cls = load_env_class(self.env["name"]) if self.env and self.env.get("name") else None
        self._agent = load_agent(self.env["agent"]) if self.env and self.env.get("agent") else None
        self._env_makers = EnvMakers()
        bind_cpus(omp_threads_bind)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gib)))  # vLLM parses whole GiB

        import vllm  # lazy: the module imports without vLLM

        kwargs = dict(
            model=str(model_path),
            dtype=dtype,
            max_model_len=self.max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
            logprobs_mode="processed_logprobs",
        )
        if self.tensor_parallel_size == 1:
            kwargs["distributed_executor_backend"] = "uni"
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_lora_rank:  # lora.sync=adapter: the learner's adapters are served with vLLM's LoRA support
            kwargs.update(enable_lora=True, max_lora_rank=int(max_lora_rank), max_loras=1)
        real_sleep = sleep_mode and sleep_mode_available()
        if real_sleep:
            kwargs["enable_sleep_mode"] = True
        t0 = time.perf_counter()
        self._llm = vllm.LLM(**kwargs)
        self.phases = EngineSleep(self._llm, real=real_sleep, name=generator_id) if sleep_mode else None
        """Sleep/wake phases (``placement=colocated``); None: the engine never sleeps."""
        adapter_dir = tempfile.mkdtemp(prefix=f"ray-rlhf-lora-{generator_id}-") if max_lora_rank else None
        self._engine = engine = VllmEngine(self._llm, self.tensor_parallel_size, self.phases, adapter_dir)
        # Adapter sync loads no full weights (and vLLM's LoRA-wrapped logits head cannot be probed
        # outside a batch): no names to check payloads against.
        names = set(engine.read_back()) if self.tensor_parallel_size == 1 and not max_lora_rank else None
        self.weights = WeightReceiver(engine, generator_id, names)
        """The weight-sink side of the broadcast: loads, group membership, read-back checksums.
        The broadcaster runs its methods in this actor (:func:`ray_rlhf.sync.remote.call`); in a
        test, call them directly (``generator.weights.load(version, state)``)."""
        self._warm_up()
        self.startup_seconds = time.perf_counter() - t0

    @property
    def version(self) -> int:
        """Policy version of the weights the engine holds (0: as loaded from ``model_path``)."""
        return self.weights.version

    # ------------------------------------------------------------------ set-up helpers

    def _warm_up(self) -> None:
        """First generate call pays ~3 s of one-off kernel set-up; pay it at start, not in step 1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self._llm.get_tokenizer()("a", add_special_tokens=True)["input_ids"] or [0]
        self._llm.generate([TokensPrompt(prompt_token_ids=list(ids))], SamplingParams(max_tokens=1), use_tqdm=False)

    # ------------------------------------------------------------------ generation

    def generate(self, shard: PromptShard, sampling: SamplingSpec) -> tuple[ShardReport, RolloutBatch]:
        """``sampling.n`` completions of every prompt of ``shard``, ordered by (prompt, sample).

        Returns a small :class:`ShardReport` and the :class:`RolloutBatch` (run it with Ray's
        ``num_returns=2`` so the pool can account for the shard without fetching the batch).
        Prompt ids are used as they are (tokenized and length-checked when the dataset was loaded).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.phases is not None:
            self.phases.check_awake("generate")
            self.phases.record("generate")
        t0 = time.perf_counter()
        prompts = list(shard.prompts)
        if any(not p.prompt_ids for p in prompts):
            raise ValueError(f"{self.generator_id}: shard {shard.shard_id} holds a prompt without token ids")
        if self._env_cls is not None or self._agent is not None:
            return self._generate_trajectories(shard, sampling, t0)
        if self.partial:
            return self._generate_partial(shard, sampling, t0)
        params = [
            SamplingParams(n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                           top_p=sampling.top_p, seed=request_seed(sampling.seed, p.index), logprobs=0,
                           flat_logprobs=True, ignore_eos=sampling.ignore_eos)
            for p in prompts
        ]
        outs = self._llm.generate([TokensPrompt(prompt_token_ids=list(p.prompt_ids)) for p in prompts], params,
                                  use_tqdm=False, lora_request=self._engine.lora_request)
        completions = [(p, j, c) for p, out in zip(prompts, outs)
                       for j, c in enumerate(sorted(out.outputs, key=lambda c: c.index))]
        for p, j, c in completions:  # vLLM: "stop" = EOS sampled, "length" = max_tokens (or context) used up
            if c.finish_reason not in FINISH_REASONS[:2]:  # single turn: "stop" or "length"
                raise RuntimeError(f"{self.generator_id}: prompt {p.index} sample {j} finished with {c.finish_reason!r}")
        rows = [(p, j, c.token_ids, c.logprobs.logprobs, c.finish_reason, c.text) for p, j, c in completions]
        return self._shard_result(shard, rows, self.version, t0)

    def _shard_result(self, shard: PromptShard, rows: list[tuple], policy_version, t0: float,
                      token_versions: list[list[int]] | None = None) -> tuple[ShardReport, RolloutBatch]:
        """The shard's report and batch (:func:`~ray_rlhf.generation.shard.shard_batch`)."""
        batch = shard_batch(shard, rows, policy_version, self.generator_id, token_versions)
        report = ShardReport(shard.shard_id, self.generator_id, len(batch), int(batch.response_lengths.sum()),
                             time.perf_counter() - t0, int(batch.policy_version.min()) if len(batch) else self.version)
        return report, batch

    def _generate_partial(self, shard: PromptShard, sampling: SamplingSpec,
                          t0: float) -> tuple[ShardReport, RolloutBatch]:
        """``partial``: every (prompt, sample) as its own request on an engine-step loop that
        takes delivered weights between steps (:func:`~ray_rlhf.generation.partial.generate_interruptible`).
        Sample ``j`` of a prompt has seed ``request_seed(seed, prompt index) + j`` (what vLLM gives
        the ``j``-th child of an ``n``-sample request)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        items = [(p, j) for p in shard.prompts for j in range(sampling.n)]
        reqs = []
        for p, j in items:
            base = request_seed(sampling.seed, p.index)
            reqs.append(Resumable(list(p.prompt_ids), sampling.max_new_tokens, None if base is None else base + j,
                                  self.version))

        def params_for(r: Resumable) -> SamplingParams:
            return SamplingParams(n=1, max_tokens=r.remaining, temperature=sampling.temperature, top_p=sampling.top_p,
                                  seed=r.seed_now, logprobs=0, flat_logprobs=True, ignore_eos=sampling.ignore_eos,
                                  output_kind=RequestOutputKind.CUMULATIVE)

        stats = generate_interruptible(self._llm.llm_engine, reqs, params_for, self.weights, lambda: self.version,
                                       lambda ids: TokensPrompt(prompt_token_ids=ids), self.generator_id)
        self.interruptions += stats.interruptions
        tok = self._llm.get_tokenizer()
        rows = [(p, j, r.tokens, r.logprobs, r.finish_reason,
                 r.text if r.text is not None else tok.decode(r.tokens, skip_special_tokens=True))
                for (p, j), r in zip(items, reqs)]
        return self._shard_result(shard, rows, [r.start_version for r in reqs], t0, [r.versions for r in reqs])

    def _turn_sampler(self, sampling: SamplingSpec) -> Sampler:
        """One turn of every request in one ``LLM.generate`` call, with the run's sampling settings."""
        return turns_sampler(self._llm, sampling, self._engine.lora_request, self.generator_id)

    def _limits(self, sampling: SamplingSpec) -> TrajectoryLimits:
        e = self.env
        return TrajectoryLimits(max_new_tokens=sampling.max_new_tokens, max_turns=int(e["max_turns"]),
                                max_total_tokens=min(int(e.get("max_total_tokens") or self.max_model_len),
                                                     self.max_model_len),
                                step_timeout_s=float(e["step_timeout_s"]))

    def _generate_trajectories(self, shard: PromptShard, sampling: SamplingSpec,
                               t0: float) -> tuple[ShardReport, RolloutBatch]:
        """Multi-turn: ``sampling.n`` trajectories of every prompt with the environment
        (``env.scheduling``: ``turns``, every turn of every live trajectory in one engine call,
        :func:`~ray_rlhf.generation.trajectory.run_trajectories`; ``continuous``, each trajectory's
        turn added to the running engine when ready,
        :func:`~ray_rlhf.generation.engine_stepper.run_continuous`); or, with ``env.agent``, ``sampling.n`` rollouts of the agent
        against this generator's chat-completions endpoint
        (:func:`~ray_rlhf.generation.openai_endpoint.run_agent_rollouts`)."""
        e = self.env
        limits, kwargs = self._limits(sampling), dict(e.get("kwargs") or {})
        if self._agent is not None:
            import asyncio

            from ray_rlhf.generation.openai_endpoint import run_agent_rollouts

            delta = TemplateDelta(self._llm.get_tokenizer())
            batch, stats, batcher = asyncio.run(run_agent_rollouts(
                shard.prompts, sampling.n, self._turn_sampler(sampling), self._agent, delta, limits, kwargs,
                seed=sampling.seed, policy_version=self.version, generator_id=self.generator_id))
            stats.engine_seconds, stats.wall_seconds = batcher.busy_seconds, time.perf_counter() - t0
            log.info("%s: shard %d, %d agent rollouts, %d engine calls of %.1f requests on average",
                     self.generator_id, shard.shard_id, len(batch), len(batcher.batch_sizes),
                     sum(batcher.batch_sizes) / max(len(batcher.batch_sizes), 1))
        else:
            cls = self._env_cls
            delta = TemplateDelta(self._llm.get_tokenizer(), getattr(cls, "tools", None))
            with self._env_makers.shard(e, cls) as make_env:  # in this process, or env actors (env.num_cpus)
                if e.get("scheduling", "turns") == "continuous":  # each trajectory's turn as soon as it is ready
                    batch, stats = run_continuous(self._llm, sampling, self._engine.lora_request, self.generator_id,
                                                  shard.prompts, sampling.n, make_env, delta, limits, self.version)
                else:  # every live trajectory's turn in one engine call
                    batch, stats = run_trajectories(shard.prompts, sampling.n, self._turn_sampler(sampling), make_env,
                                                    delta, limits, seed=sampling.seed,
                                                    policy_version=self.version, generator_id=self.generator_id)
        model_tokens = int(batch.model_mask.sum())
        report = ShardReport(shard.shard_id, self.generator_id, len(batch), model_tokens, time.perf_counter() - t0,
                             self.version, env=stats.as_dict())
        return report, batch

    # ------------------------------------------------------------------ colocated phases

    def sleep(self) -> dict:
        """After generation (``placement=colocated``): release the engine's weights and KV cache
        (vLLM sleep level 1 where available). Returns ``{"released": bool, "events": [...]}``: whether
        memory was released, and the engine's events since the last :meth:`sleep` / :meth:`wake_up`
        (``load``, ``generate``, ``sleep``). Raises if the engine was built without ``sleep_mode``."""
        released = self._phases().sleep()
        return {"released": released, "events": self.phases.take_events()}

    def wake_up(self) -> dict:
        """Before the next weight load and rollout: the inverse of :meth:`sleep` (same return)."""
        restored = self._phases().wake_up()
        return {"released": restored, "events": self.phases.take_events()}

    def placement(self) -> dict:
        """Where this engine runs (:func:`~ray_rlhf.telemetry.placement.actor_placement`); ``device``:
        vLLM's platform (``cpu`` for vLLM's CPU build, whatever GPUs Ray declared)."""
        from vllm.platforms import current_platform

        from ray_rlhf.telemetry.placement import actor_placement

        return actor_placement(current_platform.device_type)

    def _phases(self) -> EngineSleep:
        if self.phases is None:
            raise RuntimeError(f"{self.generator_id}: started without sleep_mode (placement=split); it never sleeps")
        return self.phases

    # ------------------------------------------------------------------ housekeeping

    def ping(self) -> str:
        return self.generator_id

    def info(self) -> dict:
        """pid, id, version, memory (bytes) and CPU affinity, for the pool and benchmarks."""
        import psutil

        rss = psutil.Process().memory_info().rss
        # ru_maxrss (KiB on Linux) comes from the kernel's lazily updated high-water mark and can
        # trail the current RSS by a few pages: the peak is at least what is resident now.
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss)
        return {
            "pid": os.getpid(),
            "generator_id": self.generator_id,
            "version": self.version,
            "rss_bytes": rss,
            "peak_rss_bytes": peak,
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "received_checksum": self.weights.received_checksum,
            "startup_seconds": getattr(self, "startup_seconds", None),
        }

    def shutdown(self) -> None:
        """Leave any weight group, stop the engine and free its memory; the object is unusable after."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self.weights.leave_group()
        self._engine.close()
        self._llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            try:
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("vLLM distributed teardown: %s", e)
            gc.collect()
