"""A rollout generator: one vLLM engine running in this process.

Plain class; the driver wraps it with ``ray.remote(num_cpus=..)(Generator)`` at launch, a test
builds it directly. vLLM is imported inside ``__init__`` so this module imports without vLLM.

Engine settings (ENV-NOTES.md): ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and
``distributed_executor_backend="uni"`` keep the engine in this process, so tensors handed to
``collective_rpc`` (weight loads, read-backs) are passed by reference, not serialised.

Token ids: prompts are tokenized here with the engine's own (Hugging Face) tokenizer and
``add_special_tokens=True`` -- the ids the engine sees, BOS included exactly when HF tokenization
adds it -- and returned in :attr:`Rollout.prompt_ids`. The learner uses these ids as they are.

Sampler log-probs: the engine runs with ``logprobs_mode="processed_logprobs"`` and requests
``logprobs=0``. ``logprobs=0`` returns exactly the sampled token's log-prob (``logprobs=1`` adds the
top-1 token besides it); "processed" means after temperature and top-p, i.e. the log-prob under the
distribution the token was actually drawn from (vLLM's default is the raw model distribution).

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
import hashlib
import logging
import os
import resource
import time
from pathlib import Path

from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptShard, Rollout, SamplingSpec
from ray_rlhf.sync.base import LoadReport, WeightSyncError
from ray_rlhf.sync.checksum import IGNORED_SUFFIXES, named_tensors, state_dict_checksum, tensor_bytes

__all__ = ["Generator", "core_list_for", "request_seed", "state_dict_checksum"]

log = logging.getLogger(__name__)

_SEED_RANGE = 2**31 - 2**16
"""Per-prompt seeds stay below 2**31 with room for vLLM's ``seed + j`` for sample ``j``."""


def request_seed(base: int | None, prompt_index: int) -> int | None:
    """The vLLM seed of one prompt's request: a hash of (``base``, ``prompt_index``).

    vLLM fans ``n`` samples out into child requests with seeds ``seed + j`` (j = sample index), so
    sample ``j`` of prompt ``i`` is fixed by (base, i, j) -- whichever generator or shard it lands
    in. ``None`` (no base seed) leaves sampling unseeded.
    """
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_RANGE


def core_list_for(index: int, cores_per_engine: int = 1) -> str:
    """Round-robin core list for the ``index``-th engine, over the cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    start = (index * cores_per_engine) % len(cores)
    picked = [cores[(start + k) % len(cores)] for k in range(min(cores_per_engine, len(cores)))]
    return ",".join(str(c) for c in picked)


class Generator:
    """One vLLM engine, in-process; produces :class:`Rollout` records and loads new weights.

    Args:
        model_path: Hugging Face model directory (config, safetensors, tokenizer).
        generator_id: name stamped on every rollout (diagnostics, pool bookkeeping).
        max_model_len: engine context length (``generators.max_model_len``).
        max_prompt_tokens: longest accepted prompt (``data.max_prompt_tokens``).
        seed: engine seed (unseeded requests draw from it).
        dtype: engine weight dtype; the learner must send this dtype.
        gpu_memory_utilization: GPU memory fraction (GPU only; None: vLLM's default).
        tensor_parallel_size: >1 only on GPU clusters (uses vLLM's default executor, not in-process).
        kv_cache_gib: CPU KV cache, whole GiB (``VLLM_CPU_KVCACHE_SPACE``).
        enforce_eager: no torch.compile / CUDA graphs (fast start, what CPU wants).
        omp_threads_bind: ``"nobind"`` (default), ``"auto"`` or a core list; see module docstring.
    """

    def __init__(
        self,
        model_path: str | Path,
        generator_id: str,
        max_model_len: int,
        max_prompt_tokens: int,
        seed: int = 0,
        dtype: str = "float32",
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        kv_cache_gib: float = 1,
        enforce_eager: bool = True,
        omp_threads_bind: str = "nobind",
    ):
        if not Path(model_path, "config.json").is_file():
            raise UserError(f"model directory {model_path} has no config.json; check model.path or build the model first")
        self.generator_id = generator_id
        self.max_model_len = int(max_model_len)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.version = 0
        """Policy version of the weights the engine holds (0: as loaded from ``model_path``)."""
        self._received_checksum = ""
        self._group = None  # CollectiveReceiver while in a weight group
        self._bind_cpus(omp_threads_bind)
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
        t0 = time.perf_counter()
        self._llm = vllm.LLM(**kwargs)
        self._tokenizer = self._llm.get_tokenizer()
        self._hf_names = set(self._engine_state()) if self.tensor_parallel_size == 1 else None
        self._warm_up()
        self.startup_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ set-up helpers

    @staticmethod
    def _bind_cpus(omp_threads_bind: str) -> None:
        if omp_threads_bind == "auto":
            return
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
        if omp_threads_bind == "nobind":
            return
        cores: set[int] = set()
        for part in omp_threads_bind.split(","):
            lo, _, hi = part.strip().partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise UserError(f"omp_threads_bind={omp_threads_bind!r}: expected 'nobind', 'auto' or cores like '0-1,3'")
            cores.update(range(int(lo), int(hi or lo) + 1))
        os.sched_setaffinity(0, cores)
        os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))

    def _warm_up(self) -> None:
        """First generate call pays ~3 s of one-off kernel set-up; pay it at start, not in step 1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self._tokenize(["a"])[0] or [0]
        self._llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1), use_tqdm=False)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self._tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def _engine_state(self):
        from ray_rlhf.sync.vllm_readback import engine_hf_state_dict

        return self._llm.collective_rpc(engine_hf_state_dict)[0]

    # ------------------------------------------------------------------ generation

    def generate(self, shard: PromptShard, sampling: SamplingSpec) -> list[Rollout]:
        """``sampling.n`` completions of every prompt of ``shard``, ordered by (prompt, sample).

        Raises :class:`UserError` before any engine work if a prompt is empty or longer than
        ``max_prompt_tokens``, or if prompt + ``max_new_tokens`` exceeds ``max_model_len``.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = list(shard.prompts)
        ids = self._tokenize([p.text for p in prompts])
        for p, x in zip(prompts, ids):
            if not x:
                raise UserError(f"prompt {p.index} is empty after tokenization; drop it from the dataset")
            if len(x) > self.max_prompt_tokens:
                raise UserError(
                    f"prompt {p.index} is {len(x)} tokens long, more than data.max_prompt_tokens="
                    f"{self.max_prompt_tokens}; shorten the prompt or raise data.max_prompt_tokens"
                )
            if len(x) + sampling.max_new_tokens > self.max_model_len:
                raise UserError(
                    f"prompt {p.index} ({len(x)} tokens) + rollout.max_new_tokens={sampling.max_new_tokens} exceeds "
                    f"generators.max_model_len={self.max_model_len}; raise it or shorten prompts/responses"
                )
        params = [
            SamplingParams(
                n=sampling.n,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=request_seed(sampling.seed, p.index),
                logprobs=0,
            )
            for p in prompts
        ]
        outs = self._llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
        rollouts = []
        for p, x, out in zip(prompts, ids, outs):
            for j, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"{self.generator_id}: prompt {p.index} sample {j} finished with {c.finish_reason!r}")
                resp = list(c.token_ids)
                lps = [float(c.logprobs[t][tok].logprob) for t, tok in enumerate(resp)]
                rollouts.append(
                    Rollout(
                        prompt_index=p.index,
                        sample_index=j,
                        prompt=p.text,
                        response=c.text,
                        prompt_ids=list(x),
                        response_ids=resp,
                        sampler_logprobs=lps,
                        finish_reason=c.finish_reason,
                        policy_version=self.version,
                        generator_id=self.generator_id,
                    )
                )
        return rollouts

    # ------------------------------------------------------------------ weights

    def load_weights(self, version: int, weights, verify: bool = True) -> LoadReport:
        """Load a full HF-named state dict (mapping or (name, tensor) pairs) as ``version``.

        One ``reload_weights`` call per sync (never a second ``model.load_weights`` on CPU: the
        repacked layers reject it). A payload missing an engine tensor, or carrying an unknown
        one, is refused BEFORE the engine is touched (the engine would keep stale weights for a
        missing layer). Prefix-cache entries computed with the old weights are dropped.
        With ``verify``, also records the checksum of the tensors as received.
        """
        pairs = [(n, t) for n, t in named_tensors(weights) if not n.endswith(IGNORED_SUFFIXES)]
        if self._hf_names is not None:
            got = {n for n, _ in pairs}
            missing, extra = self._hf_names - got, got - self._hf_names
            if missing or extra:
                raise WeightSyncError(
                    f"generator {self.generator_id}: version {version} payload is missing {sorted(missing)[:5]} "
                    f"and has unknown {sorted(extra)[:5]}; not loaded (still version {self.version})"
                )
        self._received_checksum = state_dict_checksum(pairs) if verify else ""
        t0 = time.perf_counter()
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})
        self._llm.reset_prefix_cache()
        seconds = time.perf_counter() - t0
        self.version = int(version)
        return LoadReport(self.version, tensor_bytes(pairs), seconds, self._received_checksum)

    def weights_checksum(self) -> str:
        """:func:`state_dict_checksum` of the weights the ENGINE computes with, read back in HF
        naming (see :mod:`ray_rlhf.sync.vllm_readback`). Equal to the learner's checksum iff every
        tensor arrived and loaded exactly. With tensor_parallel_size > 1 (no read-back yet) it
        falls back to the checksum of the tensors as received, with a warning.
        """
        if self.tensor_parallel_size != 1:
            log.warning("tensor_parallel_size > 1: weights_checksum is the received-tensor checksum")
            return self._received_checksum
        return state_dict_checksum(self._engine_state())

    # ------------------------------------------------------------------ collective backend

    def join_weight_group(self, group, rank: int) -> None:
        """Join the learner's broadcast group (``group`` is a :class:`GroupInfo`) as ``rank`` >= 1."""
        from ray_rlhf.sync.collective import CollectiveReceiver

        self.leave_weight_group()
        self._group = CollectiveReceiver(group, rank)

    def receive_weights(self, version: int, verify: bool = True) -> LoadReport:
        """Receive one broadcast (matching the learner's ``weight_group_send(version)``) and load it."""
        if self._group is None:
            raise RuntimeError(f"generator {self.generator_id} is in no weight group; join_weight_group first")
        return self.load_weights(version, self._group.receive(version), verify)

    def leave_weight_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    # ------------------------------------------------------------------ housekeeping

    def get_version(self) -> int:
        return self.version

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
            "received_checksum": self._received_checksum,
            "startup_seconds": getattr(self, "startup_seconds", None),
        }

    def shutdown(self) -> None:
        """Leave any weight group, stop the engine and free its memory; the object is unusable after."""
        self.leave_weight_group()
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
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
