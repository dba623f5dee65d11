"""Per-GPU memory budget of ``placement=colocated``: does one GPU hold a vLLM engine AND a learner rank?

Pure arithmetic (no torch, no Ray): the preflight check (:func:`ray_rlhf.preflight.check_memory_budget`)
fills in the numbers from the config and the model's files and prints :meth:`GpuBudget.line` when it
does not fit. All sizes are bytes.

The learner rank (``learner.dtype`` float32 or bfloat16: the master weights, gradients and AdamW
state are float32 either way, :class:`~ray_rlhf.config.training.LearnerConfig`):

- weights ``4 P``, gradients ``4 P``, AdamW's two moments ``8 P`` -- 16 bytes per parameter,
  divided by ``learner.num`` with ``learner.strategy=fsdp`` (FSDP2 shards all three), whole on
  every rank with ``ddp``;
- the frozen reference ``4 P`` (divided by the ranks with ``fsdp`` and ``learner.shard_reference``);
- an activation allowance for one micro-batch of ``T`` tokens (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", eq. 2 without the ``5 a s / h`` attention-score
  term, which memory-efficient attention does not store): ``34 h`` bytes per token per layer at
  2-byte compute, scaled by ``compute_bytes / 2``; with gradient checkpointing only each layer's
  input (``2 h`` per token per layer, same scaling) plus one layer recomputed in full; plus the
  float32 logits and their log-softmax, ``2 x 4 V`` per token.

The engine (vLLM) takes ``gpu_memory_utilization x GPU memory`` for its weights (``P x`` engine dtype
bytes), KV cache and activations, and must fit its weights inside that share.

The phases of a colocated step (:mod:`ray_rlhf.run.placement`):

- generating: the engine's whole share + the learner's weights and reference (gradients and AdamW
  state offloaded to CPU, no activations);
- training: the whole learner + what the sleeping engine keeps -- nothing beyond its CUDA context
  with vLLM's sleep mode (level 1: weights to CPU, KV cache dropped), its whole share without it.

Each process (engine, learner rank) also holds a CUDA context and allocator slack:
:data:`CONTEXT_BYTES` each. It fits when both phases fit in the GPU and the engine's weights fit in
its share. An estimate for refusing what cannot work, not a guarantee that what passes will.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
CONTEXT_BYTES = 1 * GIB
"""CUDA context, kernels and allocator slack per process (an engine or a learner rank)."""
MASTER_BYTES = 4
"""float32 master weights, gradients and each AdamW moment (also under ``learner.dtype=bfloat16``)."""


@dataclass(frozen=True)
class LearnerMemory:
    """What one learner rank holds on its GPU, in bytes."""

    weights: float
    grads: float
    optimizer: float
    """AdamW's two moments."""
    reference: float
    activations: float

    @property
    def total(self) -> float:
        """While training: everything."""
        return self.weights + self.grads + self.optimizer + self.reference + self.activations

    @property
    def resident(self) -> float:
        """While the engine generates: weights and reference (gradients and AdamW state offloaded)."""
        return self.weights + self.reference


def activation_bytes(tokens: int, hidden: int, layers: int, vocab: int, compute_bytes: int = 4,
                     checkpointing: bool = False) -> float:
    """Activation allowance of one micro-batch of ``tokens`` tokens (module docstring).

    ``34 h`` bytes per token and layer at 2-byte compute (Korthikanti et al. 2022, eq. 2, no score
    term) times ``compute_bytes / 2``; checkpointed: ``2 h`` per layer plus one full layer; plus
    ``8 V`` per token for the float32 logits and their log-softmax.
    """
    scale = compute_bytes / 2
    per_layer = 34 * hidden * scale * tokens
    body = (layers * 2 * hidden * scale * tokens + per_layer) if checkpointing else layers * per_layer
    return body + tokens * vocab * 2 * MASTER_BYTES


def learner_memory(params: int, ranks: int = 1, fsdp: bool = False, shard_reference: bool = False,
                   activations: float = 0.0) -> LearnerMemory:
    """One rank's :class:`LearnerMemory` for a policy of ``params`` parameters."""
    shard = ranks if fsdp and ranks > 1 else 1
    ref_shard = shard if shard_reference else 1
    return LearnerMemory(weights=MASTER_BYTES * params / shard, grads=MASTER_BYTES * params / shard,
                         optimizer=2 * MASTER_BYTES * params / shard, reference=MASTER_BYTES * params / ref_shard,
                         activations=activations)


@dataclass(frozen=True)
class GpuBudget:
    """One GPU of a colocated placement: an engine and a learner rank, phase by phase."""

    gpu: float
    """The GPU's memory."""
    learner: LearnerMemory
    engine_share: float
    """``gpu_memory_utilization x gpu``: what the engine takes while awake."""
    engine_weights: float
    engine_sleeps: bool = True
    """vLLM's sleep mode releases the share while the learner trains (else it keeps it)."""

    @property
    def generating(self) -> float:
        return self.engine_share + self.learner.resident + 2 * CONTEXT_BYTES

    @property
    def training(self) -> float:
        return self.learner.total + (0.0 if self.engine_sleeps else self.engine_share) + 2 * CONTEXT_BYTES

    @property
    def fits(self) -> bool:
        return max(self.generating, self.training) <= self.gpu and self.engine_weights <= self.engine_share

    def line(self) -> str:
        """The budget in one line (GiB)."""
        g, lm = (lambda b: f"{b / GIB:.2f}"), self.learner
        return (f"per GPU of {g(self.gpu)} GiB: training {g(self.training)} GiB (learner weights {g(lm.weights)} + "
                f"grads {g(lm.grads)} + AdamW {g(lm.optimizer)} + reference {g(lm.reference)} + activations "
                f"{g(lm.activations)} + {'sleeping engine 0' if self.engine_sleeps else 'engine ' + g(self.engine_share)}"
                f" + contexts {g(2 * CONTEXT_BYTES)}), generating {g(self.generating)} GiB (engine share "
                f"{g(self.engine_share)} + learner weights and reference {g(lm.resident)} + contexts "
                f"{g(2 * CONTEXT_BYTES)}); engine weights {g(self.engine_weights)} GiB in its share")
