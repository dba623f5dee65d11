"""The learner: an engine running an objective (PPO, or a critic-free estimator, today).

A plain class (the learner group wraps it with ``ray.remote``; tests build it in-process). It
builds the policy (+ value head where the estimator has a critic) and its frozen reference, hands
them to the :class:`~ray_rlhf.learning.engine.Engine` (wrapping, micro-batches, AdamW, the ranks'
collectives, weight export) and runs the :class:`~ray_rlhf.learning.objectives.ppo.PPOObjective`
on it. One call to :meth:`Learner.step` takes a scored :class:`~ray_rlhf.records.RolloutBatch` and

1. collates it into padded tensors (:func:`~ray_rlhf.learning.batch.collate`);
2. :meth:`~Learner.prepare`: the objective's fixed quantities (log-probs, values, advantages);
3. :meth:`~Learner.update`: the engine's epochs of minibatches on the objective's loss;
4. the objective's ``finish`` (the KL controller), bumps the policy version and returns the
   objective's :class:`~ray_rlhf.learning.stats.LearnerStats` record.

The same code runs at any number of ranks (``learner.num``). Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ray_rlhf.config.training import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning import checkpointing
from ray_rlhf.learning.batch import PreparedBatch, TensorBatch, collate
from ray_rlhf.learning.dist import free_address
from ray_rlhf.learning.engine import Engine, EngineOptions, Optimization
from ray_rlhf.learning.loading import load_causal_lm
from ray_rlhf.learning.lora import AdapterOffReference, Adapters, LoraSpec
from ray_rlhf.learning.objectives.ppo import PPOObjective
from ray_rlhf.learning.stats import LearnerStats, Stats, UpdateStats, combine
from ray_rlhf.models.policy import PolicyWithValueHead, ReferenceModel
from ray_rlhf.records import RolloutBatch
from ray_rlhf.sync.checksum import state_dict_checksum
from ray_rlhf.sync.sender import WeightSender


@dataclass(frozen=True)
class LearnerOptions:
    """A rank's run-level settings, resolved from the run config by the learner group."""

    algo: AlgoConfig = field(default_factory=AlgoConfig)
    response_budget: int = 32
    """``rollout.max_new_tokens``: Dr. GRPO's L_max."""
    max_staleness: int = 0
    """``rollout.max_staleness``: the learner refuses older samples; >= 1 turns the off-policy
    correction on."""
    old_logprobs_from_sampler: bool = False
    kl_in_loss: bool = False
    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    compile: bool = False
    shard_reference: bool = False
    """``learner.shard_reference``: FSDP2-shard the frozen reference too (``fsdp``, several ranks)."""
    overlong: str = "keep"
    """``rollout.overlong``: truncated responses kept, masked out of the loss, or penalised."""
    overlong_buffer: int = 0
    """``rollout.overlong_buffer``: DAPO's L_cache for ``overlong=penalty``."""
    collective_timeout_s: float = 300.0
    packing: bool = False
    """``ppo.packing`` resolved (the group resolves ``auto`` once, with the probe, for every rank):
    each micro-batch's rows run as one packed sequence (:mod:`ray_rlhf.models.packing`)."""
    reserved_cpus: float = 1.0
    """``learner.num_cpus``: a rank's threads in an asynchronous run when ``torch_threads`` is empty."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """``lora.*``: LoRA adapters on the policy (rank 0: off, full fine-tuning)."""

    @property
    def engine(self) -> EngineOptions:
        """The engine's part (its fields, by name)."""
        return EngineOptions(**{f.name: getattr(self, f.name) for f in fields(EngineOptions)})


def default_threads(opt: LearnerOptions, pinned: int | None = None) -> int:
    """A rank's torch threads when ``learner.torch_threads`` is empty: the cores the other phases
    leave it (see the config field): its pinned cores, or in a synchronous run the node's cores
    shared by the ranks, in an asynchronous run its reserved CPUs."""
    import os

    if pinned:
        return pinned
    if opt.max_staleness > 0:
        return max(1, int(opt.reserved_cpus))
    return max(1, (os.cpu_count() or 1) // opt.world_size)


class Learner:
    """Policy (+ value head for an estimator with a critic), frozen reference, the engine and PPO."""

    def __init__(self, model_path: str, ppo: PPOConfig, kl: KLConfig, seed: int = 0, device: str = "cpu",
                 temperature: float = 1.0, critic_path: str | None = None, torch_threads: int | None = None,
                 options: LearnerOptions | None = None, cores: list[int] | None = None,
                 lm: torch.nn.Module | None = None):
        """``lm``: a causal LM already built (the GPU check's random-init models of real shapes)
        instead of loading ``model_path``; its config's ``pad_token_id`` (or 0) pads the batches."""

        if cores:
            import os

            os.sched_setaffinity(0, set(cores))
        self.options = opt = options or LearnerOptions()
        torch.set_num_threads(torch_threads or default_threads(opt, len(cores) if cores else None))
        torch.manual_seed(seed)
        self.ppo, self.kl_cfg, self.device = ppo, kl, device
        self.objective = PPOObjective(ppo, kl, opt.algo, temperature=temperature, response_budget=opt.response_budget,
                                      max_staleness=opt.max_staleness, kl_in_loss=opt.kl_in_loss,
                                      old_logprobs_from_sampler=opt.old_logprobs_from_sampler,
                                      overlong=opt.overlong, overlong_buffer=opt.overlong_buffer)
        self.uses_critic = self.objective.uses_critic
        self.model_path = str(model_path)
        if lm is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            pad = self.tokenizer.pad_token_id
            lm = load_causal_lm(model_path, device)
        else:
            self.tokenizer, pad = None, getattr(lm.config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else 0
        critic = load_causal_lm(critic_path, device) if critic_path else None
        self.adapters = Adapters(lm, opt.lora) if opt.lora.enabled else None
        """LoRA (``lora.rank > 0``): the policy LM's adapters, injected in place; None: full fine-tuning."""
        model = PolicyWithValueHead(lm, critic, value_head=self.uses_critic).to(device)
        reference = None
        if self.objective.needs_reference:  # LoRA: the policy's own LM with its adapters off (no copy)
            reference = AdapterOffReference(self.adapters, model) if self.adapters else ReferenceModel(copy.deepcopy(lm))
        model.packed = opt.packing
        if reference is not None:
            reference.packed = opt.packing
        optim = Optimization(epochs=ppo.epochs, minibatch_size=ppo.minibatch_size, micro_batch_size=ppo.micro_batch_size,
                             micro_batch_tokens=ppo.micro_batch_tokens, lr=ppo.lr, weight_decay=ppo.weight_decay,
                             max_grad_norm=ppo.max_grad_norm)
        self.engine = Engine(model, reference, opt.engine, optim, device=device, seed=seed, adapters=self.adapters)
        adapter_sync = self.adapters is not None and opt.lora.sync == "adapter"
        self.weights = WeightSender(self.engine.policy_state, self.adapters.payload if adapter_sync else None)
        """The weight-source side of the broadcast."""
        self.version = 0
        """Policy version: 0 = initial weights, +1 per update."""

    # ---- what the engine and the objective hold (checkpoints and tests read them here) ----------
    model = property(lambda self: self.engine.model, doc="The policy (+ value head), unwrapped.")
    reference = property(lambda self: self.engine.reference, doc="The frozen reference.")
    train_model = property(lambda self: self.engine.train_model, doc="The policy as trained (DDP / FSDP2).")
    optimizer = property(lambda self: self.engine.optimizer, doc="AdamW (None until the group is joined).")
    comm = property(lambda self: self.engine.comm, doc="The learner ranks' collectives.")
    rng = property(lambda self: self.engine.rng, doc="The minibatch-shuffling generator.")
    sharded = property(lambda self: self.engine.sharded, doc="FSDP2 over several ranks.")
    kl_ctl = property(lambda self: self.objective.kl_ctl, doc="The KL coefficient's controller.")

    @property
    def temperature(self) -> float:
        """The sampler's temperature, which the log-probs divide the logits by."""
        return self.objective.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.objective.temperature = value

    # ---- the learner group ---------------------------------------------------------------------
    def group_address(self) -> tuple[str, int]:
        """Rank 0: where the group's TCP store will listen."""
        return free_address()

    def join_group(self, host: str, port: int) -> None:
        """Join the learner ranks' process group, then shard/wrap the model and build AdamW."""
        self.engine.join_group(host, port)

    # ---- one step ----------------------------------------------------------------------------
    def prepare(self, batch: TensorBatch) -> tuple[PreparedBatch, Stats]:
        """The objective's fixed quantities of ``batch`` and their statistics (a record that reads
        like a dict too: ``stats["kl_ref"]``)."""
        return self.objective.prepare(batch, self.engine)

    def update(self, prep: PreparedBatch) -> dict[str, float]:
        """The engine's epochs of minibatches on the objective's loss; the loss record's averages
        and the engine's numbers (``grad_norm``, ``optimizer_steps``, tokens) by name."""
        loss, engine = self.engine.train(prep, self.objective.loss)
        return {**(loss.to_dict() if loss is not None else {}), **engine.to_dict()}

    def _micro_step(self, prep: PreparedBatch, idx: torch.Tensor | None, n_seq: int, real) -> Stats:
        """Forward and backward of one micro-batch (tests accumulate gradients with it)."""
        return self.engine.micro_step(prep, idx, n_seq, real, self.objective.loss)[0]

    def step(self, rollouts: RolloutBatch) -> LearnerStats:
        """One update on a scored batch; returns diagnostics and bumps :attr:`version`."""
        t0 = time.perf_counter()
        batch = collate(rollouts, self.pad_id)
        lag = self.version - batch.policy_versions
        if int(lag.max()) > self.options.max_staleness:
            raise RuntimeError(f"staleness bound violated: learner at version {self.version} got samples of version "
                               f"{int(batch.policy_versions.min())} (rollout.max_staleness={self.options.max_staleness})")
        tv = rollouts.token_versions  # rollout.partial: the version of every response token
        if tv is not None and len(tv) and self.version - int(tv.min()) > self.options.max_staleness:
            raise RuntimeError(f"per-token staleness bound violated: learner at version {self.version} got a token "
                               f"sampled by version {int(tv.min())} (rollout.max_staleness={self.options.max_staleness})")
        prep, pstats = self.prepare(batch)
        t1 = time.perf_counter()
        loss, ustats = self.engine.train(prep, self.objective.loss) if len(prep.batch) else (None, UpdateStats())
        t2 = time.perf_counter()
        done = self.objective.finish(prep, pstats, batch)
        self.version += 1
        self.engine.refresh_export()
        return combine(self.objective.stats_type, pstats, loss, ustats, done, version=self.version,
                       lr=self.optimizer.param_groups[0]["lr"], response_tokens=int(batch.response_mask.sum()),
                       prepare_seconds=t1 - t0, update_seconds=t2 - t1, staleness_mean=float(lag.float().mean()),
                       staleness_max=int(lag.max()))

    # ---- weights for the generators (the WeightSource surface; see ray_rlhf.sync) ---------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy LM's weights under Hugging Face checkpoint names, as CPU tensors (value head
        excluded; LoRA: merged), whatever ``lora.sync`` sends."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.engine.policy_state().items()}

    def weights_checksum(self, names: tuple[str, ...] | None = None) -> str:
        """:func:`~ray_rlhf.sync.checksum.state_dict_checksum` of :meth:`hf_state_dict` (only
        ``names``, if given)."""
        return state_dict_checksum(self.engine.policy_state(), names)

    def ping(self) -> int:
        return self.version

    def placement(self) -> dict:
        """Where this rank runs (:func:`~ray_rlhf.telemetry.placement.actor_placement`)."""
        from ray_rlhf.telemetry.placement import actor_placement

        return actor_placement(str(self.engine.device))

    def offload(self) -> int:
        """``placement=colocated``, before the engines generate: AdamW state to CPU, gradients freed
        (:meth:`~ray_rlhf.learning.engine.Engine.offload`); returns the bytes moved."""
        return self.engine.offload()

    def reload(self) -> int:
        """``placement=colocated``, before the update: AdamW state back on the device."""
        return self.engine.reload()

    # ---- full state, for checkpoints (see ray_rlhf.learning.checkpointing) ---------------------
    def save_state(self, directory: str | Path) -> None:
        """Write the full learner state into ``directory`` (every rank calls it; rank 0 writes)."""
        checkpointing.save(self, Path(directory))

    def load_state(self, directory: str | Path) -> None:
        """Restore what :meth:`save_state` wrote (every rank reads it)."""
        checkpointing.load(self, Path(directory))
        self.engine.refresh_export()

    def save_part(self, uri: str, staging) -> dict[str, int]:
        """This rank's part of a checkpoint into the store at ``uri`` (rank 0 writes; with FSDP the
        others take part in gathering the full state); returns the files and sizes written."""
        import tempfile

        from ray_rlhf.checkpoint import open_store

        if self.comm.rank == 0:
            return open_store(uri).write_part(staging, self.save_state)
        with tempfile.TemporaryDirectory() as scratch:
            self.save_state(scratch)
        return {}

    def load_part(self, uri: str, ckpt) -> None:
        """Load a checkpoint of the store at ``uri``, fetched to this node when it is remote."""
        import tempfile

        from ray_rlhf.checkpoint import open_store

        with tempfile.TemporaryDirectory() as scratch:
            self.load_state(open_store(uri).fetch(ckpt, scratch))
