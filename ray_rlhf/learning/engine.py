"""The learner's engine: what every objective (PPO today; SFT, reward models, DPO next) trains with.

The :class:`Engine` owns the trained model and the frozen reference, their wrapping (gradient
checkpointing, ``torch.compile``, DDP or FSDP2 over the learner ranks, bf16 autocast), the
micro-batching (rows or a token budget, rows split over the ranks by tokens, equal pass counts on
every rank), AdamW with gradient-norm clipping, the reductions of statistics over micro-batches and
ranks, and the weights it exports. It knows nothing of advantages or clipping: an objective
(:mod:`ray_rlhf.learning.objectives`) hands it

* to :meth:`Engine.gather`, a function of one micro-batch that runs forward passes without
  gradients (each rank its rows; the results are gathered so that every rank holds the whole batch);
* to :meth:`Engine.train`, its prepared batch and ``loss(micro, forward) -> (loss, stats)``, the
  loss of one :class:`Micro` batch and its :class:`~ray_rlhf.learning.stats.Stats` record.

Every loss is a sum over the micro-batch's tokens divided by a count of the whole (global)
minibatch (:attr:`Micro.num_tokens`), so micro-batches and ranks add up to the minibatch's
gradient; the frameworks' gradient average is undone by :func:`~ray_rlhf.learning.parallel.loss_scale`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from ray_rlhf.learning import parallel
from ray_rlhf.learning.batch import TensorBatch, micro_batches, partition_rows
from ray_rlhf.learning.dist import Single, init_group
from ray_rlhf.learning.lora import Adapters, trainable_parameters
from ray_rlhf.learning.stats import Stats, UpdateStats, divided, merged, reduce_kinds, summed, with_values
from ray_rlhf.models.packing import first_fit


@dataclass(frozen=True)
class EngineOptions:
    """The learner rank's place in the group and how its model is wrapped (``learner.*``)."""

    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    compile: bool = False
    shard_reference: bool = False
    collective_timeout_s: float = 300.0
    packing: bool = False
    """Packed micro-batches (``ppo.packing`` resolved): rows binned first-fit by real tokens
    under ``micro_batch_tokens`` and run as one sequence each; padded tokens = real tokens."""


@dataclass(frozen=True)
class Optimization:
    """Epochs, minibatches, micro-batches and AdamW of an update."""

    epochs: int = 1
    minibatch_size: int = 32
    """Sequences per optimizer step."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass, when ``micro_batch_tokens`` is None."""
    micro_batch_tokens: int | None = None
    """Token budget of one pass (rows x longest row)."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


class Prepared(Protocol):
    """What the engine needs of an objective's prepared batch: rows it can select and trim."""

    batch: TensorBatch

    def select(self, rows: torch.Tensor) -> Prepared: ...

    def trimmed(self) -> Prepared: ...


P = TypeVar("P", bound=Prepared)


@dataclass(frozen=True)
class Micro(Generic[P]):
    """One forward/backward pass of a minibatch."""

    data: P
    """This pass's rows of the prepared batch, trimmed of padding no row needs."""
    empty: bool
    """A pass only to keep the ranks' collectives in step: its loss must contribute nothing."""
    num_sequences: int
    """Sequences of the whole (global) minibatch."""
    num_tokens: torch.Tensor
    """Trained response tokens of the whole (global) minibatch (at least 1): the model's own,
    :attr:`~ray_rlhf.learning.batch.TensorBatch.train_mask`."""

    @property
    def mask(self) -> torch.Tensor:
        """The pass's trained tokens, :attr:`~ray_rlhf.learning.batch.TensorBatch.train_mask`: the
        response tokens less a multi-turn row's observation tokens (all 0 for an empty pass).
        Shape: (b, t)."""
        return self.data.batch.train_mask * (0.0 if self.empty else 1.0)


Forward = Callable[..., object]
"""The trained model's forward on a :class:`TensorBatch` (``forward(batch, **kwargs)``)."""
Loss = Callable[[Micro, Forward], tuple[torch.Tensor, Stats]]


class Engine:
    """Model (+ reference), wrapping, micro-batches, AdamW, collectives and weight export of one rank."""

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module | None, options: EngineOptions,
                 optim: Optimization, device: str = "cpu", seed: int = 0, adapters: Adapters | None = None):
        """``adapters``: the policy LM's LoRA adapters (``lora.rank > 0``): only the parameters that
        require a gradient (adapters, value head) are optimized, and LoRA's dropout is on in the update."""
        self.model, self.reference, self.options, self.optim, self.device = model, reference, options, optim, device
        self.adapters = adapters
        if options.gradient_checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if options.compile:
            parallel.compile_layers(model.lm, reference.lm if reference is not None else None, model.critic)
        self.rng = torch.Generator().manual_seed(seed)
        """Minibatch shuffling."""
        self.comm = Single()
        self.train_model = model
        """The model as trained: wrapped by DDP, or (FSDP2) sharded in place."""
        self.optimizer: torch.optim.Optimizer | None = None
        self._joined = False
        self._lm_state: dict[str, torch.Tensor] | None = None  # gathered full weights (FSDP)
        if options.world_size == 1:
            self._build_optimizer()

    # ---- the learner group -----------------------------------------------------------------------
    def join_group(self, host: str, port: int) -> None:
        """Join the learner ranks' process group, then shard/wrap the model and build AdamW."""
        opt = self.options
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        self.comm = init_group(host, port, opt.rank, opt.world_size, backend, opt.collective_timeout_s)
        self._joined = True
        self.train_model = parallel.wrap(self.model, opt.strategy, opt.world_size, self.device, opt.dtype)
        if self.sharded and opt.shard_reference and self.reference is not None \
                and next(self.reference.parameters(), None) is not None:
            # (LoRA's reference is the policy itself with its adapters off: nothing of its own to shard)
            parallel.wrap(self.reference, "fsdp", opt.world_size, self.device, opt.dtype)
        self._build_optimizer()
        self.refresh_export()

    def _build_optimizer(self) -> None:
        # fused on CUDA: one kernel over all parameters (the per-tensor loop of foreach AdamW through
        # FSDP2's DTensors costs milliseconds per parameter on the host); same update
        fused = {"fused": True} if torch.device(self.device).type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(trainable_parameters(self.model), lr=self.optim.lr,
                                           weight_decay=self.optim.weight_decay, **fused)

    @property
    def sharded(self) -> bool:
        """FSDP2: over several ranks, or at one rank that joined a group of one (the GPU check)."""
        return self.options.strategy == "fsdp" and (self.options.world_size > 1 or self._joined)

    def autocast(self):
        """``learner.dtype=bfloat16``: bf16 compute under autocast, float32 weights, gradients and
        optimizer; log-probs and values leave the model in float32. Under FSDP2 the policy's
        mixed-precision policy casts its parameters to bf16 already; autocast then still puts the
        frozen reference, which is not sharded unless ``learner.shard_reference``, in bf16 (without
        it the reference ran in float32: on an H200 half of ``prepare``)."""
        if self.options.dtype != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    # ---- passes --------------------------------------------------------------------------------
    def forward(self, batch: TensorBatch, **kwargs):
        """The trained model's forward on ``batch`` (under autocast where it applies)."""
        with self.autocast():
            return self.train_model(*batch.inputs(), **kwargs)

    def _passes(self, rows: torch.Tensor, lengths: torch.Tensor, equal: bool) -> list[torch.Tensor | None]:
        """This rank's micro-batches of ``rows``; with ``equal``, padded with empty passes (None)
        to the largest count over the ranks: a sharded forward or DDP's gradient all-reduce is a
        collective every rank must join."""
        if self.options.packing and self.optim.micro_batch_tokens is not None:
            bins = first_fit(rows.tolist(), [int(lengths[i]) for i in rows.tolist()], self.optim.micro_batch_tokens)
            micros = [torch.tensor(b, dtype=torch.long) for b in bins]
        else:
            micros = micro_batches(rows, lengths, self.optim.micro_batch_size, self.optim.micro_batch_tokens)
        if not equal:
            return micros
        most = int(self.comm.all_reduce_max(torch.tensor([len(micros)])).item())
        return list(micros) + [None] * (most - len(micros))

    @torch.no_grad()
    def gather(self, batch: TensorBatch, fn: Callable[[TensorBatch], dict[str, torch.Tensor]],
               names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``fn`` over this rank's micro-batches of ``batch`` (its rows split by tokens), without
        gradients and under autocast; each of ``names`` of its results, a (b, t) tensor, padded to
        the batch's width and gathered from every rank. Shape: each (B, T)."""
        B, T = batch.response_ids.shape
        mine = partition_rows(batch.lengths, self.comm.world_size)[self.comm.rank]
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        rows = []
        for idx in self._passes(mine, batch.lengths, equal=self.sharded):
            mb = batch.select(idx if idx is not None else torch.zeros(1, dtype=torch.long)).trimmed()
            with self.autocast():
                out = fn(mb)
            if idx is None:  # a pass only to keep sharded ranks in step
                continue
            for n in names:
                parts[n].append(torch.nn.functional.pad(out[n], (0, T - mb.response_ids.shape[1])))
            rows.append(idx)
        rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        none = batch.response_mask.new_zeros(0, T)
        return {n: self.comm.gather_rows(torch.cat(parts[n]) if parts[n] else none, rows_t, B) for n in names}

    # ---- the update ----------------------------------------------------------------------------
    def train(self, prep: Prepared, loss: Loss) -> tuple[Stats | None, UpdateStats]:
        """``optim.epochs`` passes of shuffled minibatches of ``prep``, one AdamW step each; the
        loss record averaged over the optimizer steps (None: no rows, no step), and the engine's
        own numbers."""
        o = self.optim
        self.train_model.train(self.options.gradient_checkpointing)  # dropout is off either way (learning.loading)
        if self.adapters is not None:
            self.adapters.train_dropout(True)  # lora.dropout: the adapters' own, in the update only
        lengths = prep.batch.lengths
        total, grad_norm, padded, real, steps = None, 0.0, 0.0, 0.0, 0
        for _ in range(o.epochs):
            for mb in torch.randperm(len(prep.batch), generator=self.rng).split(o.minibatch_size):
                stats, norm, p, r = self._minibatch(prep, mb, lengths, loss)
                total = stats if total is None else summed(total, stats)
                grad_norm, padded, real, steps = grad_norm + norm, padded + p, real + r, steps + 1
        if self.adapters is not None:
            self.adapters.train_dropout(False)
        if not steps:
            return None, UpdateStats()
        return divided(total, steps), UpdateStats(grad_norm=grad_norm / steps, optimizer_steps=steps,
                                                  padded_tokens=int(padded), real_tokens=int(real))

    def _minibatch(self, prep: Prepared, mb: torch.Tensor, lengths: torch.Tensor, loss: Loss):
        """Forward and backward of this rank's share of minibatch ``mb``, then one optimizer step:
        (the loss record over every rank, the gradient norm, padded and real tokens)."""
        real = prep.batch.train_mask[mb].sum().clamp(min=1.0)
        mine = mb[partition_rows(lengths[mb], self.comm.world_size)[self.comm.rank]]
        # every rank runs as many passes (empty ones where it holds fewer rows, even none):
        # DDP's gradient all-reduce and FSDP's all-gathers pair up across the ranks
        micros = self._passes(mine, lengths, equal=self.comm.world_size > 1)
        self.optimizer.zero_grad(set_to_none=True)
        acc, padded, real_tokens = None, 0.0, 0.0
        for i, idx in enumerate(micros):
            with parallel.accumulating(self.train_model, self.options.strategy, last=i == len(micros) - 1):
                stats, p, r = self.micro_step(prep, idx, len(mb), real, loss)
            acc = stats if acc is None else merged(acc, stats)
            padded, real_tokens = padded + p, real_tokens + r
        acc, padded, real_tokens = self._reduce(acc, padded, real_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.optim.max_grad_norm)
        self.optimizer.step()
        return acc, float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm), padded, real_tokens

    def micro_step(self, prep: Prepared, idx: torch.Tensor | None, n_seq: int, real: torch.Tensor,
                   loss: Loss) -> tuple[Stats, float, float]:
        """Forward and backward of one micro-batch of a minibatch of ``n_seq`` sequences and ``real``
        response tokens (``idx`` None: an empty pass); its loss record, padded and real tokens."""
        empty = idx is None
        idx = torch.zeros(1, dtype=torch.long) if empty else idx.to(self.device)
        data = prep.select(idx).trimmed()
        value, stats = loss(Micro(data, empty, n_seq, real), self.forward)
        (value * parallel.loss_scale(self.options.world_size)).backward()
        b = data.batch
        if empty:
            return stats, 0.0, 0.0
        real_tokens = float(b.lengths.sum())
        padded = real_tokens if self.options.packing else float(b.prompt_ids.numel() + b.response_ids.numel())
        return stats, padded, real_tokens

    def _reduce(self, acc: Stats, *sums: float) -> tuple:
        """One minibatch's record (and extra sums) over the ranks: sums, and maxima where a field says so."""
        if self.comm.world_size == 1:
            return (acc, *sums)
        kinds = reduce_kinds(acc) + ["sum"] * len(sums)
        values = [float(v) for v in acc.to_dict().values()] + list(sums)
        total = self.comm.all_reduce_sum(torch.tensor([0.0 if k == "max" else v for k, v in zip(kinds, values)],
                                                      dtype=torch.float64))
        most = self.comm.all_reduce_max(torch.tensor([v if k == "max" else 0.0 for k, v in zip(kinds, values)],
                                                     dtype=torch.float64))
        out = [float(most[i] if k == "max" else total[i]) for i, k in enumerate(kinds)]
        n = len(kinds) - len(sums)
        return (with_values(acc, out[:n]), *out[n:])

    # ---- weights for the generators and checkpoints --------------------------------------------
    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy LM's state dict, Hugging Face names (gathered after each step under FSDP;
        with LoRA adapters, merged into the base weights in float32)."""
        if self.adapters is not None:
            return self.adapters.merged_state(self._lm_state if self.sharded else None)
        return self._lm_state if self.sharded else self.model.lm.state_dict()

    def refresh_export(self) -> None:
        """Under FSDP every rank takes part in gathering the full weights rank 0 exports."""
        if self.sharded:
            full = parallel.full_state_dict(self.model, self.options.world_size, "fsdp")
            self._lm_state = {k.removeprefix("lm."): v for k, v in full.items() if k.startswith("lm.")}

    # ---- placement=colocated: room for the engine on this GPU while it generates ---------------
    def offload(self) -> int:
        """Move the AdamW moments to CPU memory and free the gradients, while the engine sharing
        this GPU generates; returns the bytes of optimizer state moved. The gradients are freed, not
        moved: every minibatch starts with ``zero_grad(set_to_none=True)``. The scalar ``step``
        counters stay where AdamW keeps them. On CPU the moments are already in CPU memory (moving
        is a no-op) but the bytes are counted all the same."""
        for p in self.model.parameters():
            p.grad = None
        return self._move_optimizer_state("cpu")

    def reload(self) -> int:
        """Before the update: the AdamW moments back on :attr:`device`; returns the bytes moved."""
        return self._move_optimizer_state(self.device)

    def _move_optimizer_state(self, device: str) -> int:
        moved = 0
        for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key] = value.to(device, non_blocking=device == "cpu" and value.is_cuda)
                    moved += value.numel() * value.element_size()
        if device == "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies are done before the engine takes the memory
            torch.cuda.empty_cache()
        return moved
