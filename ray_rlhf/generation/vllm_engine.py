"""The weight side of one in-process vLLM engine: load a Hugging Face state dict, read it back.

:class:`VllmEngine` is the :class:`~ray_rlhf.sync.receiver.Engine` a generator hands its
:class:`~ray_rlhf.sync.receiver.WeightReceiver`: :meth:`VllmEngine.reload` loads a full state dict
(:func:`reload_hf_weights`), :meth:`VllmEngine.read_back` reads the weights the engine actually
computes with back in Hugging Face naming (:func:`engine_hf_state_dict`). Both run inside the vLLM
worker via ``llm.collective_rpc``. Why the read-back is needed:

- vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj``;
- vLLM's CPU backend repacks every linear weight after loading (oneDNN handle or sgl-kernel
  packed blob captured in ``layer.cpu_linear``) and leaves ``layer.weight`` as an EMPTY tensor, so
  ``named_parameters()`` shows ``torch.Size([0])`` for all of them;
- the LM head (``ParallelLMHead``, or the input embedding for models that compute logits with it,
  e.g. Gemma 2 and Cohere) keeps its ``weight`` -- the embedding lookup reads it -- AND a packed
  copy in ``cpu_linear`` that the logits are computed from. The two can disagree: after a
  ``reload_weights`` whose payload has no ``lm_head.weight`` (the checkpoint form of a tied model),
  a TIED ``lm_head`` (Llama/Qwen/GPT-2/Gemma 3/Granite with ``tie_word_embeddings``) shares the new
  embedding tensor but its packed copy still holds the OLD matrix (vLLM 0.32 CPU: the layer got no
  weights of its own, so it is not re-processed). The engine then samples from stale logits
  (measured: 0.14-0.20 mean |log-prob| error) while ``lm_head.weight`` looks right;
- ``reload_weights`` silently keeps the OLD weights of a layer that received none of its tensors
  (only a log warning) and leaves UNINITIALISED memory in the part of a fused layer that received
  only some (e.g. ``v_proj`` missing -> garbage rows in ``qkv_proj``, no warning at all).

So the read-back probes the packed kernels themselves: ``layer.cpu_linear(I, w, None)`` with ``I``
an identity block returns rows of ``W^T`` -- exactly, because each output element is ``w * 1``
plus exact zeros (checked bit-for-bit against the checkpoint on this machine for float32; the
checksum also maps ``-0.0`` and subnormals to ``0`` in case a kernel flushes them). The module the
logits come from is found by running ``model.compute_logits`` once on a zero row and watching
which ``cpu_linear`` it calls; its probe is reported as ``lm_head.weight`` (the name the HF state
dict uses, tied or not). Fused tensors are split by the layer's ``output_sizes`` and renamed
through the model's ``packed_modules_mapping`` (a one-element mapping -- Phi-3 -- means the
checkpoint itself is fused: kept as is); GPT-2's Conv1D weights are transposed back to HF's
``(in, out)``; embedding/LM-head rows padded beyond ``vocab_size`` are trimmed.

Updating weights: :func:`reload_hf_weights` is the ``collective_rpc`` target that loads a full HF
state dict correctly for every architecture of the matrix: the plain ``reload_weights`` call
crashes on Gemma 2 when the tied ``lm_head.weight`` is in the payload (and leaves the layers on
the meta device) and leaves a tied head stale when it is not. It drops the alias where vLLM has no
such parameter, reloads, and :func:`refresh_logits_head` re-packs the head from its current weight.

Adapters (``lora.sync=adapter``): the engine runs with vLLM's LoRA support and its base weights
never change; :meth:`VllmEngine.load_adapter` writes each version's adapters as a PEFT folder and
serves them under a new adapter id (vLLM serves a known id from its cache, without reading the
folder), :meth:`VllmEngine.adapter_read_back` reads that folder again and
:meth:`VllmEngine.probe_logprobs` asks the engine for prompt log-probs under the adapter: the
receiver compares both with the learner's (:mod:`ray_rlhf.sync.adapter`). The packed-kernel
read-back above is not used then (vLLM's LoRA-wrapped logits head cannot be probed outside a batch).

Limits: tensor_parallel_size 1 (each rank holds shards otherwise), dense models (MoE expert
stacks are not mapped back), unquantised weights, vLLM module names equal to HF names apart from
the fusions above (models with a ``hf_to_vllm_mapper`` rename are not mapped back). On GPU the
weights are not repacked and are read directly. Probing costs about one forward pass over
``hidden_size`` tokens per linear layer (the LM head included).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ray_rlhf.sync.checksum import SAMPLE_SUFFIX

__all__ = ["HEAD_NAME", "EngineAsleepError", "EngineSleep", "VllmEngine", "engine_hf_state_dict", "logits_module",
           "refresh_logits_head", "reload_hf_weights", "sleep_mode_available"]

_PROBE_ROWS = 1024
"""Identity rows per probe call: bounds the probe's input to 1024 x in_features."""
_PROBE_OUT_ELEMENTS = 1 << 26
"""Bound on one probe call's output (rows x out_features): 256 MB in float32, so an LM head
with a 150 k vocabulary is probed ~450 rows at a time."""

_CONV1D_WEIGHTS: dict[str, tuple[str, ...]] = {"gpt2": ("c_attn", "c_proj", "c_fc")}
"""``model_type`` -> module names whose HF weights are Conv1D ``(in, out)``: vLLM transposes them
on load (``GPT2Model._transpose_conv1d``), the read-back transposes them back."""

HEAD_NAME = "lm_head.weight"
"""HF name of the output projection when vLLM's head is ``lm_head`` or the input embedding."""
_EMBEDDINGS = ("embed_tokens", "wte")


@torch.no_grad()
def _linear_weight(layer: torch.nn.Module, in_features: int | None = None, column: int | None = None) -> torch.Tensor:
    """The (out_features, in_features) weight a CPU linear layer's ``cpu_linear`` computes with;
    with ``column``: only its column ``column % in_features``, shape (out_features, 1) -- one probe
    row, about ``1 / in_features`` of the whole read-back's cost."""
    w = layer.weight
    k = int(in_features if in_features is not None else layer.input_size_per_partition)
    n = int(w.shape[0]) if w.numel() else int(sum(getattr(layer, "output_partition_sizes", [0])) or 1)
    dtype = getattr(layer, "params_dtype", None) or w.dtype
    if column is not None:
        x = torch.zeros(1, k, dtype=dtype)
        x[0, column % k] = 1
        return layer.cpu_linear(x, w, None).t().contiguous()  # (out, 1) = W e_j
    step = max(1, min(_PROBE_ROWS, _PROBE_OUT_ELEMENTS // n))
    cols = []
    for start in range(0, k, step):
        rows = min(step, k - start)
        x = torch.zeros(rows, k, dtype=dtype)
        x[:, start : start + rows] = torch.eye(rows, dtype=dtype)
        cols.append(layer.cpu_linear(x, w, None))  # (rows, out) = I_block @ W^T
    return torch.cat(cols, dim=0).t().contiguous()


@torch.no_grad()
def logits_module(model: torch.nn.Module, hidden_size: int, dtype: torch.dtype) -> tuple[str, torch.nn.Module] | None:
    """(name, module) whose ``cpu_linear`` computes the logits, or None when none does (GPU).

    Found by calling ``model.compute_logits`` on one zero row with every candidate's ``cpu_linear``
    wrapped to record the call: works whether the head is ``lm_head`` (tied or not) or the input
    embedding itself (Gemma 2, Cohere).
    """
    candidates = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "cpu_linear", None))]
    if not candidates or not hasattr(model, "compute_logits"):
        return None
    called: list[tuple[str, torch.nn.Module]] = []
    originals = {}
    for name, mod in candidates:
        orig = mod.cpu_linear
        originals[name] = orig

        def spy(x, w, b, _orig=orig, _name=name, _mod=mod):
            called.append((_name, _mod))
            return _orig(x, w, b)

        mod.cpu_linear = spy
    try:
        model.compute_logits(torch.zeros(1, hidden_size, dtype=dtype))
    finally:
        for name, mod in candidates:
            mod.cpu_linear = originals[name]
    if len(called) != 1:
        raise RuntimeError(f"expected compute_logits to call one packed linear, it called {[n for n, _ in called]}")
    return called[0]


def engine_hf_state_dict(worker, part: int = 0, parts: int = 1, sample: int | None = None) -> dict[str, torch.Tensor]:
    """``collective_rpc`` target: the worker model's weights as a Hugging Face state dict.

    Probing a CPU-packed linear layer is a matmul per layer (the read-back's cost), so with
    ``parts > 1`` only every ``parts``-th packed layer (the logits head counting as the last one),
    starting at ``part``, is probed and returned; every other tensor is returned always. Over
    ``parts`` calls with ``part = 0 .. parts-1`` every tensor is read back once. ``sample``: each
    packed layer that is not this part's is still probed on one input feature, ``sample`` modulo
    its width, and returned under its name + :data:`~ray_rlhf.sync.checksum.SAMPLE_SUFFIX` as that
    slice of the HF tensor (``t[:, j:j+1]``; ``t[j:j+1, :]`` for Conv1D ``(in, out)`` weights).
    """
    model = worker.model_runner.model
    model_config = worker.model_runner.model_config
    hf_config = model_config.hf_config
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    vocab = int(getattr(text_config, "vocab_size", 0) or 0)
    dtype = model_config.dtype
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    conv1d = _CONV1D_WEIGHTS.get(getattr(hf_config, "model_type", ""), ())
    out: dict[str, torch.Tensor] = {}
    probed = 0
    for pname, param in model.named_parameters():
        mod_name, _, attr = pname.rpartition(".")
        layer = model.get_submodule(mod_name)
        suffix = ""
        if attr == "weight" and param.numel() == 0 and hasattr(layer, "cpu_linear"):
            probed += 1
            if (probed - 1) % parts != part:
                if sample is None:
                    continue
                suffix = SAMPLE_SUFFIX
            t = _linear_weight(layer, column=sample if suffix else None)
        else:
            t = param.detach()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # e.g. a bias the CPU kernel keeps in float32; lossless back-cast
        parent, _, short = mod_name.rpartition(".")
        subs = packed.get(short)
        if subs and len(subs) > 1:
            sizes = list(getattr(layer, "output_sizes", []))
            if len(sizes) != len(subs) or sum(sizes) != t.shape[0]:
                raise RuntimeError(f"cannot split {pname} {tuple(t.shape)} into {subs} by {sizes}")
            for sub, piece in zip(subs, torch.split(t, sizes, dim=0)):
                out[(f"{parent}.{sub}.{attr}" if parent else f"{sub}.{attr}") + suffix] = piece
            continue
        if subs:  # one-element mapping: the checkpoint stores the fused tensor under that name
            pname = f"{parent}.{subs[0]}.{attr}" if parent else f"{subs[0]}.{attr}"
        if attr == "weight" and t.dim() == 2 and short in conv1d:
            t = t.t().contiguous()
        if vocab and t.dim() >= 1 and t.shape[0] > vocab and mod_name.endswith((*_EMBEDDINGS, "lm_head")):
            t = t[:vocab]
        out[pname + suffix] = t
    head = logits_module(model, int(text_config.hidden_size), dtype)
    if head is not None:  # the packed copy the logits come from, not the parameter
        name, layer = head
        turn = probed % parts == part  # else no tied alias either: the head is reported on its turn
        if turn or sample is not None:
            t = _linear_weight(layer, in_features=layer.weight.shape[-1] or int(text_config.hidden_size),
                               column=None if turn else sample)
            key = HEAD_NAME if name == "lm_head" or name.endswith(_EMBEDDINGS) else f"{name}.weight"
            out[key + ("" if turn else SAMPLE_SUFFIX)] = t[:vocab] if vocab and t.shape[0] > vocab else t
    elif getattr(text_config, "tie_word_embeddings", False) and HEAD_NAME not in out:
        emb = next((v for k, v in out.items() if k.endswith(tuple(f"{e}.weight" for e in _EMBEDDINGS))), None)
        if emb is not None:
            out[HEAD_NAME] = emb
    return out


@torch.no_grad()
def refresh_logits_head(worker) -> bool:
    """``collective_rpc`` target: re-pack the logits head from its current weight; True if done.

    Needed after ``reload_weights`` on CPU for tied heads (module docstring): the head shares the
    reloaded embedding tensor but its packed copy is stale. Re-running the layer's
    ``process_weights_after_loading`` rebuilds ``cpu_linear`` from ``layer.weight`` (the
    embedding method keeps the weight). Cost: one copy of the LM head. A no-op (False) when the
    engine has no packed head (GPU).
    """
    model = worker.model_runner.model
    model_config = worker.model_runner.model_config
    hf_config = model_config.hf_config
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    head = logits_module(model, int(text_config.hidden_size), model_config.dtype)
    if head is None:
        return False
    _, layer = head
    if layer.weight.numel() == 0:  # a repacked Linear head: reloaded with its own weights
        return False
    layer.quant_method.process_weights_after_loading(layer)
    return True


@torch.no_grad()
def reload_hf_weights(worker, weights) -> list[str]:
    """``collective_rpc`` target: ``reload_weights`` with a full HF state dict, safe for tied heads.

    ``weights``: a mapping or (name, tensor) pairs named as the HF model's ``state_dict()`` -- for a
    tied model that includes ``lm_head.weight``, the same tensor as the embedding. Measured on
    vLLM 0.32 CPU, the plain ``reload_weights`` call gets a tied head wrong both ways:

    - payload WITH ``lm_head.weight``: fails for models whose logits come from the embedding
      module itself (Gemma 2: ``ValueError: There is no module or parameter named 'lm_head'``);
    - payload WITHOUT it (checkpoint form): Llama/Qwen/GPT-2/Gemma 3/Granite keep computing logits
      from the packed copy of the OLD embedding (silently).

    So: drop ``lm_head.weight`` when the model ties it and has no parameter of that name (after
    checking it equals the embedding it is tied to), reload, then :func:`refresh_logits_head`.
    Returns the names dropped. Raises ``ValueError`` for a tied engine sent an untied head.
    """
    model = worker.model_runner.model
    hf_config = worker.model_runner.model_config.hf_config
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    pairs = list(weights.items()) if hasattr(weights, "items") else [(str(n), t) for n, t in weights]
    dropped: list[str] = []
    if getattr(text_config, "tie_word_embeddings", False):
        by_name = dict(pairs)
        head = by_name.get(HEAD_NAME)
        emb = next((t for n, t in pairs if n.endswith(tuple(f"{e}.weight" for e in _EMBEDDINGS))), None)
        if head is not None and emb is not None and head is not emb and not torch.equal(head, emb):
            raise ValueError(
                f"{HEAD_NAME} differs from the input embedding, but the engine's model ties them "
                "(tie_word_embeddings=True): the sender's model is untied; load it with the same config"
            )
        try:
            model.get_parameter(HEAD_NAME)
        except AttributeError:
            pairs = [(n, t) for n, t in pairs if n != HEAD_NAME]
            dropped.append(HEAD_NAME)
    worker.reload_weights(weights_iterator=pairs)
    refresh_logits_head(worker)
    return dropped


class VllmEngine:
    """The :class:`~ray_rlhf.sync.receiver.Engine` of one in-process ``vllm.LLM``: load and read back.

    ``tensor_parallel_size > 1``: loads work, read-backs do not (each rank holds only shards; the
    config refuses ``sync.verify`` there).
    """

    def __init__(self, llm, tensor_parallel_size: int = 1, phases: EngineSleep | None = None,
                 adapter_dir: str | Path | None = None):
        self.llm = llm
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.phases = phases
        """The engine's sleep/wake phases (``placement=colocated``): loads are refused while asleep."""
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        """``lora.sync=adapter``: where each version's adapter folder is written (the engine was
        started with ``enable_lora``); None: no LoRA."""
        self.lora_request = None
        """The ``vllm.lora.request.LoRARequest`` of the adapter every later generation uses; None: the base model."""
        self._last_id = 0

    def reload(self, weights) -> None:
        """One ``reload_weights`` call in the worker (never a second ``model.load_weights`` on CPU:
        the repacked layers reject it), made safe for tied LM heads and followed by a refresh of
        the packed head (:func:`reload_hf_weights`); prefix-cache entries computed with the old
        weights are dropped. Refused (:class:`EngineAsleepError`) while the engine sleeps."""
        if self.phases is not None:
            self.phases.check_awake("load")
            self.phases.record("load")
        self.llm.collective_rpc(reload_hf_weights, kwargs={"weights": weights})
        self.llm.reset_prefix_cache()

    def load_adapter(self, payload, version: int) -> None:
        """``lora.sync=adapter``: write ``payload`` (an :class:`~ray_rlhf.sync.adapter.AdapterPayload`)
        as a PEFT folder, load it into the engine as a NEW adapter (a fresh int id: vLLM serves a
        known id from its cache without reading the folder) and use it for all later generation;
        the previous adapter is removed from the engine and its folder deleted."""
        from vllm.lora.request import LoRARequest

        from ray_rlhf.sync.adapter import write_peft_dir

        if self.adapter_dir is None:
            raise RuntimeError("load_adapter: the engine was started without LoRA (lora.sync=adapter sets max_lora_rank)")
        if self.phases is not None:
            self.phases.check_awake("load")
            self.phases.record("load")
        lora_id = self._adapter_id()
        path = write_peft_dir(payload, self.adapter_dir / f"v{version}-id{lora_id}")
        request = LoRARequest(f"policy-v{version}", lora_id, str(path))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load adapter {path}")
        old, self.lora_request = self.lora_request, request
        if old is not None and old.lora_int_id != lora_id:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        if old is not None and old.lora_path != str(path):
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def _adapter_id(self) -> int:
        """A new vLLM adapter id per load (1, 2, ...)."""
        self._last_id += 1
        return self._last_id

    def adapter_read_back(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, config) of the folder the current adapter was loaded from, read again."""
        from ray_rlhf.sync.adapter import read_peft_dir

        if self.lora_request is None:
            return {}, {"r": 0, "lora_alpha": 0.0, "target_modules": []}
        return read_peft_dir(self.lora_request.lora_path)

    def probe_logprobs(self, token_ids: tuple[int, ...]) -> torch.Tensor:
        """The engine's log-prob of each token of ``token_ids`` after the first, given the ones
        before it, under the current adapter (vLLM ``prompt_logprobs``, temperature 1). Shape: (T - 1,)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = list(token_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=self.lora_request,
                                use_tqdm=False)[0]
        return torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float32)

    def close(self) -> None:
        """Delete the adapter folders (the engine is being shut down)."""
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)

    def read_back(self, part: int = 0, parts: int = 1, sample: int | None = None) -> dict[str, torch.Tensor]:
        """The weights the engine computes with (:func:`engine_hf_state_dict`): all of them, or the
        cheap ones plus rotating ``part`` of ``parts`` of the probed ones (and, with ``sample``,
        one sampled input feature of every other probed one)."""
        if self.tensor_parallel_size != 1:
            raise RuntimeError("weights_checksum: no engine read-back across tensor-parallel ranks")
        kwargs = {"part": part, "parts": parts, "sample": sample}
        return self.llm.collective_rpc(engine_hf_state_dict, kwargs=kwargs)[0]


def sleep_mode_available() -> bool:
    """Whether this process's vLLM platform has sleep mode (``enable_sleep_mode=True``, ``llm.sleep``,
    ``llm.wake_up``): CUDA and ROCm (and XPU) builds yes; vLLM's CPU build no -- its config refuses
    ``enable_sleep_mode`` there ("Sleep mode is not supported on current platform")."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


class EngineAsleepError(RuntimeError):
    """The engine was asked to generate or load weights while asleep (a phase-order bug)."""


class EngineSleep:
    """The sleep/wake phases of one engine under ``placement=colocated``, enforced and recorded.

    ``llm``: the engine, started with ``enable_sleep_mode=True`` when ``real`` (see
    :func:`sleep_mode_available`); ``llm=None`` or ``real=False`` (vLLM's CPU build): the engine
    keeps its memory, but the phases are enforced and recorded all the same -- :meth:`sleep` only
    from awake, :meth:`wake_up` only from asleep, and :meth:`check_awake` raises
    :class:`EngineAsleepError` for work while asleep -- so a CPU test sees the order a GPU runs.

    :attr:`events` records, in order, ``"sleep"``, ``"wake_up"`` and what :meth:`record` is given
    (the generator records ``"generate"`` and ``"load"``); :meth:`take_events` hands them over and
    starts a new record. ``level``: vLLM's sleep level (1: weights offloaded to CPU memory, KV cache
    dropped -- the same model wakes up; the broadcast then loads the new weights into it).
    """

    def __init__(self, llm=None, real: bool = False, level: int = 1, name: str = "engine"):
        self.llm, self.real, self.level, self.name = llm, bool(real and llm is not None), int(level), name
        self.asleep = False
        self.events: list[str] = []

    def sleep(self) -> bool:
        """Release the engine's memory (when ``real``); returns whether memory was released."""
        if self.asleep:
            raise EngineAsleepError(f"{self.name}: sleep() while already asleep (phase order: sleep after "
                                    "generation, wake_up before the next)")
        if self.real:
            self.llm.sleep(level=self.level)
        self.asleep = True
        self.events.append("sleep")
        return self.real

    def wake_up(self) -> bool:
        """Bring the engine's memory back (when ``real``); returns whether memory was restored."""
        if not self.asleep:
            raise EngineAsleepError(f"{self.name}: wake_up() while awake (phase order: sleep after generation, "
                                    "wake_up before the next)")
        if self.real:
            self.llm.wake_up()
        self.asleep = False
        self.events.append("wake_up")
        return self.real

    def check_awake(self, what: str) -> None:
        """Raise :class:`EngineAsleepError` when asleep: ``what`` (``"generate"``, ``"load"``) needs it awake."""
        if self.asleep:
            raise EngineAsleepError(f"{self.name}: {what} while the engine sleeps (placement=colocated: the learner "
                                    "is training on this GPU); wake_up() first")

    def record(self, event: str) -> None:
        self.events.append(event)

    def take_events(self) -> list[str]:
        events, self.events = self.events, []
        return events
