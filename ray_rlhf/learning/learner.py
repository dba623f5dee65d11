"""The learner: PPO (or a critic-free estimator) on a policy, against a frozen reference.

A plain class (the learner group wraps it with ``ray.remote``; tests build it in-process). One
call to :meth:`Learner.step` takes a scored :class:`~ray_rlhf.records.RolloutBatch` and

1. collates it into padded tensors (:func:`~ray_rlhf.learning.batch.collate`);
2. :meth:`~Learner.prepare`: without gradients, the reference log-probs, the values (``gae``) and
   -- unless the sampler's are used (``ppo.old_logprobs``) -- the policy's "old" log-probs; then
   the KL to the reference and the advantages (:mod:`ray_rlhf.learning.estimate`);
3. :meth:`~Learner.update`: ``ppo.epochs`` passes over shuffled minibatches, micro-batched by
   rows or by a token budget, gradient-norm clipping and AdamW;
4. bumps the policy version and returns a :class:`~ray_rlhf.learning.stats.LearnerStats`.

The same code runs at any number of ranks (``learner.num``): rows are split over the ranks by
tokens, each rank's forward passes are gathered so that every rank holds the whole prepared batch
(whole-batch statistics need no reduction), and each minibatch's gradient is the sum over the
ranks (DDP or FSDP2, :mod:`ray_rlhf.learning.parallel`). Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ray_rlhf.algo.kl import AdaptiveKLController, FixedKLController, kl_estimate
from ray_rlhf.algo.losses import (
    aggregate,
    dr_grpo_num_tokens,
    explained_variance,
    kl_loss,
    loss_denominators,
    policy_loss,
    value_loss,
)
from ray_rlhf.algo.masked import masked_mean
from ray_rlhf.algo.overlong import overlong_penalty
from ray_rlhf.algo.rollout_correction import rollout_correction_weights
from ray_rlhf.config.training import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning import checkpointing, parallel
from ray_rlhf.learning.batch import PreparedBatch, TensorBatch, collate, micro_batches, partition_rows
from ray_rlhf.learning.dist import Single, free_address, init_group
from ray_rlhf.learning.estimate import advantage_stats, estimate
from ray_rlhf.learning.loading import load_causal_lm
from ray_rlhf.learning.stats import LearnerStats, add
from ray_rlhf.models.policy import PolicyWithValueHead, ReferenceModel
from ray_rlhf.records import RolloutBatch
from ray_rlhf.sync.sender import WeightSender
from ray_rlhf.sync.types import GroupInfo, SyncResult


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
    reserved_cpus: float = 1.0
    """``learner.num_cpus``: a rank's threads in an asynchronous run when ``torch_threads`` is empty."""


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
    """Policy (+ value head for ``gae``), frozen reference, AdamW, KL controller."""

    def __init__(self, model_path: str, ppo: PPOConfig, kl: KLConfig, seed: int = 0, device: str = "cpu",
                 temperature: float = 1.0, critic_path: str | None = None, torch_threads: int | None = None,
                 options: LearnerOptions | None = None, cores: list[int] | None = None):
        from transformers import AutoTokenizer

        if cores:
            import os

            os.sched_setaffinity(0, set(cores))
        self.options = opt = options or LearnerOptions()
        torch.set_num_threads(torch_threads or default_threads(opt, len(cores) if cores else None))
        torch.manual_seed(seed)
        self.ppo, self.kl_cfg, self.device, self.temperature = ppo, kl, device, temperature
        self.uses_critic = opt.algo.estimator == "gae"
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lm = load_causal_lm(model_path, device)
        critic = load_causal_lm(critic_path, device) if critic_path else None
        self.model = PolicyWithValueHead(lm, critic, value_head=self.uses_critic).to(device)
        self.reference = ReferenceModel(copy.deepcopy(lm))
        if opt.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if opt.compile:
            parallel.compile_layers(lm, self.reference.lm, critic)
        self.kl_ctl = AdaptiveKLController(kl.beta, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.beta)
        self.rng = torch.Generator().manual_seed(seed)
        self.comm = Single()
        self.train_model = self.model
        self.optimizer: torch.optim.Optimizer | None = None
        self._lm_state: dict[str, torch.Tensor] | None = None  # gathered full weights (FSDP)
        self.weights = WeightSender(self._policy_state)
        """The weight-source side of the broadcast (the ``weight*`` methods delegate to it)."""
        self.version = 0
        """Policy version: 0 = initial weights, +1 per update."""
        if opt.world_size == 1:
            self._build_optimizer()

    # ---- the learner group ---------------------------------------------------------------------
    def group_address(self) -> tuple[str, int]:
        """Rank 0: where the group's TCP store will listen."""
        return free_address()

    def join_group(self, host: str, port: int) -> None:
        """Join the learner ranks' process group, then shard/wrap the model and build AdamW."""
        opt = self.options
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        self.comm = init_group(host, port, opt.rank, opt.world_size, backend, opt.collective_timeout_s)
        self.train_model = parallel.wrap(self.model, opt.strategy, opt.world_size, self.device, opt.dtype)
        if self.sharded and opt.shard_reference:
            parallel.wrap(self.reference, "fsdp", opt.world_size, self.device, opt.dtype)
        self._build_optimizer()
        self._refresh_export()

    def _build_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.ppo.lr, weight_decay=self.ppo.weight_decay)

    @property
    def sharded(self) -> bool:
        return self.options.world_size > 1 and self.options.strategy == "fsdp"

    def _autocast(self):
        """``learner.dtype=bfloat16`` without FSDP2 sharding (``ddp``, or one rank): bf16 compute
        under autocast, float32 weights, gradients and optimizer (FSDP2 has its mixed-precision
        policy instead); log-probs and values leave the model in float32."""
        if self.options.dtype != "bfloat16" or self.sharded:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    # ---- phase 2a: fixed quantities --------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: TensorBatch) -> tuple[PreparedBatch, dict[str, float]]:
        """Reference (and old) log-probs, values, the KL to the reference and the advantages."""
        opt, b = self.options, batch.to(self.device)
        B, T = b.response_ids.shape
        mask = b.response_mask
        recompute = not opt.old_logprobs_from_sampler
        mine = partition_rows(b.lengths, self.comm.world_size)[self.comm.rank]
        micros = micro_batches(mine, b.lengths, self.ppo.micro_batch_size, self.ppo.micro_batch_tokens)
        micros = self._equal_count(micros) if self.sharded else micros
        olds, vals, refs, rows = [], [], [], []
        for idx in micros:
            mb = b.select(idx if idx is not None else torch.zeros(1, dtype=torch.long)).trimmed()
            width = mb.response_ids.shape[1]
            out = None
            with self._autocast():
                if recompute or self.uses_critic:
                    out = self.model(*_inputs(mb), temperature=self.temperature, with_entropy=False,
                                     with_logprobs=recompute, with_values=self.uses_critic)
                ref = self.reference(*_inputs(mb), temperature=self.temperature)
            if idx is None:  # a pass only to keep sharded ranks in step
                continue
            pad = lambda x, w=width: torch.nn.functional.pad(x, (0, T - w))  # noqa: E731
            refs.append(pad(ref))
            olds.append(pad(out.logprobs) if recompute else None)
            vals.append(pad(out.values) if self.uses_critic else None)
            rows.append(idx)
        rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        gather = lambda parts: self.comm.gather_rows(torch.cat(parts) if parts else mask.new_zeros(0, T), rows_t, B)  # noqa: E731
        ref_logprobs = gather(refs)
        old_logprobs = gather(olds) if recompute else b.sampler_logprobs
        old_values = gather(vals) * mask if self.uses_critic else None
        kl = kl_estimate(old_logprobs, ref_logprobs, self.kl_cfg.reward_estimator) * mask
        scores, extra = b.scores, {}
        if opt.overlong == "penalty":  # DAPO's soft overlong punishment, added to the score
            penalty = overlong_penalty(mask.sum(dim=1), opt.response_budget, opt.overlong_buffer)
            scores, extra["overlong_penalty_mean"] = scores + penalty.to(scores.dtype), float(penalty.mean())
        weights = None
        if recompute:  # the learner's pi_old against the sampler's: the engine mismatch (+ the lag, async)
            w, rc = rollout_correction_weights(old_logprobs, b.sampler_logprobs, mask, opt.algo.rollout_correction,
                                               opt.algo.rollout_correction_cap,
                                               token_cap=opt.algo.is_cap if opt.max_staleness > 0 else None)
            weights = w if opt.algo.rollout_correction != "none" else None
            extra.update(mismatch_kl=rc.mismatch_kl, correction_truncated_frac=rc.truncated_frac,
                         correction_masked_frac=rc.masked_frac)
        adv = estimate(opt.algo.estimator, scores=scores, kl=kl, mask=mask, beta=self.kl_ctl.value,
                       kl_in_reward=not opt.kl_in_loss, group_ids=b.group_ids, values=old_values,
                       gamma=self.ppo.gamma, lam=self.ppo.lam, whiten=self.ppo.whiten_advantages)
        stats = {
            "kl_ref": (kl * mask).sum(dim=1).mean().item(),
            "sampler_logprob_diff": masked_mean((old_logprobs - b.sampler_logprobs).abs(), mask).item()
            if recompute else math.nan,
            "value_mean": masked_mean(old_values, mask).item() if self.uses_critic else math.nan,
            **advantage_stats(adv, mask, b.group_ids), **extra,
        }
        prepared = PreparedBatch(b, old_logprobs, old_values, ref_logprobs, adv.advantages, adv.returns, weights)
        drop = torch.zeros(B, dtype=torch.bool, device=mask.device)
        if opt.algo.drop_zero_std_groups and adv.zero_std is not None:
            drop |= adv.zero_std
            stats["dropped_sequences"] = int(adv.zero_std.sum())
        if opt.overlong == "mask":  # DAPO's overlong filtering: truncated answers leave the loss
            drop |= b.truncated.to(drop.device)
            stats["overlong_masked"] = int(b.truncated.sum())
        if drop.any():
            prepared = prepared.select((~drop).nonzero().flatten())
        return prepared, stats

    # ---- phase 2b: the update ---------------------------------------------------------------
    def update(self, prep: PreparedBatch) -> dict[str, float]:
        """``ppo.epochs`` passes of shuffled minibatches; the loss is a token mean per minibatch.

        loss = policy_loss + c1 * value_loss + beta * kl_loss - c2 * entropy, each a sum over the
        minibatch's valid tokens divided by the minibatch's token count (Dr. GRPO: by B * L_max),
        so that micro-batching and ranks do not change the gradient.
        """
        p, opt = self.ppo, self.options
        self.train_model.train(opt.gradient_checkpointing)  # dropout is off either way (learning.loading)
        B = len(prep.batch)
        lengths = prep.batch.lengths
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(p.epochs):
            perm = torch.randperm(B, generator=self.rng)
            for mb in perm.split(p.minibatch_size):
                real = prep.batch.response_mask[mb].sum().clamp(min=1.0)
                mine = mb[partition_rows(lengths[mb], self.comm.world_size)[self.comm.rank]]
                micros = micro_batches(mine, lengths, p.micro_batch_size, p.micro_batch_tokens)
                # every rank runs as many passes (empty ones where it holds fewer rows, even none):
                # DDP's gradient all-reduce and FSDP's all-gathers pair up across the ranks
                micros = self._equal_count(micros) if self.comm.world_size > 1 else micros
                self.optimizer.zero_grad(set_to_none=True)
                acc: dict[str, float] = {}
                for i, idx in enumerate(micros):
                    with parallel.accumulating(self.train_model, opt.strategy, last=i == len(micros) - 1):
                        micro = self._micro_step(prep, idx, len(mb), real)
                    acc = _merge(acc, micro)
                acc = self._reduce(acc)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                self.optimizer.step()
                acc["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                totals = add(totals, acc)
                steps += 1
        out = {k: v / steps for k, v in totals.items()}
        out["optimizer_steps"] = steps
        out["padded_tokens"], out["real_tokens"] = totals.get("padded_tokens", 0.0), totals.get("real_tokens", 0.0)
        return out

    def _denominators(self, mask: torch.Tensor, n_seq: int, real: torch.Tensor):
        """Each row's loss denominator for ``algo.loss_agg`` in a minibatch of ``n_seq`` sequences and
        ``real`` tokens (:func:`~ray_rlhf.algo.losses.loss_denominators`; the two modes with one
        denominator for every row pass it as a scalar, the token mean's sum-then-divide)."""
        agg, budget = self.options.algo.agg, self.options.response_budget
        if agg == "token_mean":
            return real
        if agg == "seq_mean_token_sum_norm":
            return dr_grpo_num_tokens(n_seq, budget)
        return loss_denominators(agg, mask.sum(dim=1), n_seq, real, budget)

    def _micro_step(self, prep: PreparedBatch, idx: torch.Tensor | None, n_seq: int, real) -> dict[str, float]:
        """Forward and backward of one micro-batch of a minibatch of ``n_seq`` sequences and ``real``
        response tokens (``idx`` None: an empty pass that keeps the ranks' collectives in step and
        contributes nothing)."""
        opt, ppo = self.options, self.ppo
        empty = idx is None
        idx = torch.zeros(1, dtype=torch.long) if empty else idx.to(self.device)
        mb = prep.batch.select(idx).trimmed()
        width = mb.response_ids.shape[1]
        sel = lambda x: None if x is None else x[idx][:, :width]  # noqa: E731
        mask = mb.response_mask * (0.0 if empty else 1.0)
        n_tokens = self._denominators(mask, n_seq, real)
        with self._autocast():
            out = self.train_model(*_inputs(mb), temperature=self.temperature, with_values=self.uses_critic,
                                   entropy_grad=ppo.ent_coef > 0)
        # decoupled PPO: with asynchrony, correct for the sampler's (possibly stale) weights -- unless a
        # rollout correction's weights (prepare) already hold that same ratio pi_old / pi_sampler
        behav = mb.sampler_logprobs if opt.max_staleness > 0 and prep.weights is None else None
        pg, pgs = policy_loss(out.logprobs, sel(prep.old_logprobs), sel(prep.advantages), mask, clip_eps=ppo.clip,
                              dual_clip=ppo.dual_clip, num_tokens=n_tokens, behav_logp=behav,
                              is_cap=opt.algo.is_cap, is_mode=opt.algo.is_mode, clip_low=ppo.clip_lo,
                              clip_high=ppo.clip_hi, weights=sel(prep.weights))
        loss = pg
        stats = {"policy_loss": pg.item()}
        share = float(mask.sum() / real)  # this micro-batch's share of the minibatch's tokens
        if self.uses_critic:
            vf, vfs = value_loss(out.values, sel(prep.old_values), sel(prep.returns), mask, clip_eps=ppo.value_clip,
                                 num_tokens=n_tokens)
            loss = loss + ppo.vf_coef * vf
            stats.update(value_loss=vf.item(), value_clipfrac=vfs.clipfrac * share)
        if opt.kl_in_loss:
            kll, _ = kl_loss(out.logprobs, sel(prep.ref_logprobs), mask, self.kl_cfg.loss_estimator, num_tokens=n_tokens)
            loss = loss + self.kl_ctl.value * kll
            stats["kl_loss"] = kll.item()
        ent = aggregate(out.entropy, mask, num_tokens=real)
        if ppo.ent_coef > 0:
            loss = loss - ppo.ent_coef * aggregate(out.entropy, mask, num_tokens=n_tokens)
        (loss * parallel.loss_scale(opt.world_size)).backward()
        stats.update(entropy=ent.item(), approx_kl=pgs.approx_kl * share, clipfrac=pgs.clipfrac * share,
                     ratio_mean=pgs.ratio_mean * share, ratio_max=pgs.ratio_max,
                     is_weight_mean=pgs.is_weight_mean * share, is_weight_max=pgs.is_weight_max,
                     is_truncated_frac=pgs.is_truncated_frac * share,
                     padded_tokens=0.0 if empty else float(mb.prompt_ids.numel() + mb.response_ids.numel()),
                     real_tokens=0.0 if empty else float(mb.lengths.sum()))
        return stats

    def _equal_count(self, micros: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Pad with empty passes to the largest count over the ranks: a sharded (FSDP) forward
        all-gathers the parameters, a collective every rank must join."""
        most = int(self.comm.all_reduce_max(torch.tensor([len(micros)])).item())
        return list(micros) + [None] * (most - len(micros))

    def _reduce(self, acc: dict[str, float]) -> dict[str, float]:
        """One minibatch's diagnostics over the ranks: sums, and maxima for the ``*_max`` keys."""
        if self.comm.world_size == 1:
            return acc
        keys = sorted(acc)
        sums = self.comm.all_reduce_sum(torch.tensor([0.0 if k.endswith("_max") else acc[k] for k in keys],
                                                     dtype=torch.float64))
        maxes = self.comm.all_reduce_max(torch.tensor([acc[k] if k.endswith("_max") else 0.0 for k in keys],
                                                      dtype=torch.float64))
        return {k: float(maxes[i] if k.endswith("_max") else sums[i]) for i, k in enumerate(keys)}

    # ---- the whole step ---------------------------------------------------------------------
    def step(self, rollouts: RolloutBatch) -> LearnerStats:
        """One update on a scored batch; returns diagnostics and bumps :attr:`version`."""
        t0 = time.perf_counter()
        batch = collate(rollouts, self.pad_id)
        lag = self.version - batch.policy_versions
        if int(lag.max()) > self.options.max_staleness:
            raise RuntimeError(f"staleness bound violated: learner at version {self.version} got samples of version "
                               f"{int(batch.policy_versions.min())} (rollout.max_staleness={self.options.max_staleness})")
        prep, pstats = self.prepare(batch)
        t1 = time.perf_counter()
        ustats = self.update(prep) if len(prep.batch) else {"optimizer_steps": 0}
        t2 = time.perf_counter()
        mask = prep.batch.response_mask
        ev = explained_variance(prep.old_values, prep.returns, mask) if self.uses_critic else math.nan
        beta = self.kl_ctl.value
        self.kl_ctl.update(pstats["kl_ref"], len(batch))
        self.version += 1
        self._refresh_export()
        return LearnerStats(
            version=self.version, explained_variance=float(ev), kl_beta=beta, lr=self.optimizer.param_groups[0]["lr"],
            score_mean=float(batch.scores.mean()), response_tokens=int(batch.response_mask.sum()),
            prepare_seconds=t1 - t0, update_seconds=t2 - t1,
            staleness_mean=float(lag.float().mean()), staleness_max=int(lag.max()),
            **{k: ustats.get(k, math.nan) for k in ("policy_loss", "entropy", "approx_kl", "clipfrac", "ratio_mean",
                                                   "ratio_max", "grad_norm")},
            value_loss=ustats.get("value_loss", math.nan), value_clipfrac=ustats.get("value_clipfrac", math.nan),
            kl_loss=ustats.get("kl_loss", 0.0), optimizer_steps=int(ustats["optimizer_steps"]),
            is_weight_mean=ustats.get("is_weight_mean", 1.0), is_weight_max=ustats.get("is_weight_max", 1.0),
            is_truncated_frac=ustats.get("is_truncated_frac", 0.0),
            padded_tokens=int(ustats.get("padded_tokens", 0)), real_tokens=int(ustats.get("real_tokens", 0)),
            **{k: pstats.get(k, 0) for k in ("kl_ref", "sampler_logprob_diff", "advantage_mean", "return_mean",
                                            "value_mean", "zero_std_groups", "dropped_sequences", "overlong_masked",
                                            "overlong_penalty_mean", "correction_truncated_frac",
                                            "correction_masked_frac")},
            mismatch_kl=pstats.get("mismatch_kl", math.nan),
        )

    # ---- weights for the generators (the WeightSource surface; see ray_rlhf.sync) ---------------
    def _policy_state(self) -> dict[str, torch.Tensor]:
        """The policy LM's state dict, Hugging Face names (gathered after each step under FSDP)."""
        return self._lm_state if self.sharded else self.model.lm.state_dict()

    def _refresh_export(self) -> None:
        """Under FSDP every rank takes part in gathering the full weights rank 0 exports."""
        if self.sharded:
            full = parallel.full_state_dict(self.model, self.options.world_size, "fsdp")
            self._lm_state = {k.removeprefix("lm."): v for k, v in full.items() if k.startswith("lm.")}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy LM's weights under Hugging Face checkpoint names, as CPU tensors (value head
        excluded): what the generators load."""
        return self.weights.export()

    def weights_checksum(self, names: tuple[str, ...] | None = None) -> str:
        """:func:`~ray_rlhf.sync.checksum.state_dict_checksum` of :meth:`hf_state_dict` (only
        ``names``, if given)."""
        return self.weights.checksum(names)

    def weight_group_open(self, world_size: int, backend: str = "gloo", timeout_s: float = 300.0) -> GroupInfo:
        return self.weights.group_open(world_size, backend, timeout_s)

    def weight_group_connect(self) -> None:
        self.weights.group_connect()

    def weight_group_send(self, version: int) -> SyncResult:
        return self.weights.group_send(version)

    def weight_group_close(self) -> None:
        self.weights.group_close()

    def ping(self) -> int:
        return self.version

    # ---- full state, for checkpoints (see ray_rlhf.learning.checkpointing) ---------------------
    def save_state(self, directory: str | Path) -> None:
        """Write the full learner state into ``directory`` (every rank calls it; rank 0 writes)."""
        checkpointing.save(self, Path(directory))

    def load_state(self, directory: str | Path) -> None:
        """Restore what :meth:`save_state` wrote (every rank reads it)."""
        checkpointing.load(self, Path(directory))
        self._refresh_export()

    def save_part(self, uri: str, staging) -> dict[str, int]:
        """This rank's part of a checkpoint into the store at ``uri`` (rank 0 writes; with FSDP the
        others take part in gathering the full state); returns the files and sizes written."""
        import tempfile

        from ray_rlhf.storage import open_store

        if self.comm.rank == 0:
            return open_store(uri).write_part(staging, self.save_state)
        with tempfile.TemporaryDirectory() as scratch:
            self.save_state(scratch)
        return {}

    def load_part(self, uri: str, ckpt) -> None:
        """Load a checkpoint of the store at ``uri``, fetched to this node when it is remote."""
        import tempfile

        from ray_rlhf.storage import open_store

        with tempfile.TemporaryDirectory() as scratch:
            self.load_state(open_store(uri).fetch(ckpt, scratch))


def _inputs(b: TensorBatch):
    return b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask


def _merge(acc: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    """Token-weighted sums of micro-batch diagnostics; maxima for the ``*_max`` keys."""
    out = dict(acc)
    for k, v in new.items():
        out[k] = max(out.get(k, -math.inf), v) if k.endswith("_max") else out.get(k, 0.0) + v
    return out
