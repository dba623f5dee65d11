"""Config sections of the learner: PPO, the advantage estimator, KL, the learner ranks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ray_rlhf.algo.registry import estimator_names, resolve_loss_agg
from ray_rlhf.config.base import _Section

EstimatorName = Literal[estimator_names()]  # type: ignore[valid-type]
"""``algo.estimator``'s choices: the estimators of :mod:`ray_rlhf.algo.registry`, in registration order."""


class PPOConfig(_Section):
    epochs: int = Field(2, ge=1)
    """Passes over each rollout batch."""
    minibatch_size: int = Field(32, gt=0)
    """Sequences per optimizer step."""
    micro_batch_size: int = Field(16, gt=0)
    """Sequences per forward/backward pass (gradient accumulation inside a minibatch), when
    ``micro_batch_tokens`` is empty."""
    micro_batch_tokens: int | None = Field(None, gt=0)
    """Token budget of one forward/backward pass: sequences are sorted by length and packed so
    that (sequences x longest sequence) stays within it (one over-long sequence gets a pass of
    its own). Empty: ``micro_batch_size`` sequences per pass, in minibatch order. The gradient is
    the same either way (every loss is divided by the minibatch's token count)."""
    packing: Literal["auto", "on", "off"] = "auto"
    """Packed sequences in the learner: each micro-batch's rows concatenated without padding (one
    sequence under flash-attention; lines of at most the longest row under sdpa/eager, whose dense
    mask costs the square of a line), positions restarting per row, attention confined to each row; rows binned
    first-fit by real tokens under ``micro_batch_tokens``. ``auto``: on where a probe (a packed
    pass against the padded one, logits within 1e-5) passes for the loaded model, CPU included;
    ``on``: required (refused where attention cannot be confined per sequence); ``off``: padded."""

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_yaml_bool(cls, v):
        """YAML reads a bare ``on``/``off`` as a boolean: take it as the word."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    old_logprobs: Literal["auto", "recompute", "sampler"] = "auto"
    """Where the ratio's pi_old comes from. ``recompute``: a forward of the policy before the
    update; ``sampler``: the generators' log-probs (same weights and dtype in a synchronous run:
    they differ by ~1e-7), which saves that forward when no value is needed from the policy's
    trunk; ``auto``: ``sampler`` when the loop is synchronous (``rollout.max_staleness=0``) and the
    learner runs no policy forward in ``prepare`` anyway (a critic-free estimator or a separate
    critic), else ``recompute``."""
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate (policy trunk, LM head and value head)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    clip: float = Field(0.2, gt=0)
    """PPO ratio clip epsilon: the ratio is clipped to [1 - clip, 1 + clip] (the symmetric
    shorthand of ``clip_low`` / ``clip_high``)."""
    clip_low: float | None = Field(None, gt=0)
    """Lower clip epsilon: the ratio's floor is 1 - clip_low. Empty: ``clip``."""
    clip_high: float | None = Field(None, gt=0)
    """Upper clip epsilon: the ratio's ceiling is 1 + clip_high. Empty: ``clip``. DAPO's
    "clip-higher" (Yu et al. 2025) raises it above ``clip_low`` (0.28 vs 0.2) so that unlikely
    tokens with a positive advantage can grow, which keeps the policy's entropy from collapsing
    in long critic-free runs."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 for negative advantages (empty: off)."""
    is_cap: float = Field(2.0, ge=1)
    """Asynchronous runs (``rollout.max_staleness >= 1``): cap of the importance weight
    pi_old / pi_sampler that corrects for the sampler's stale weights (decoupled PPO)."""
    is_mode: Literal["truncate", "mask"] = "truncate"
    """``truncate``: weight min(w, is_cap); ``mask``: tokens with w > is_cap get weight 0."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip of the value prediction around the old values (empty: off)."""
    vf_coef: float = Field(0.1, ge=0)
    """c1: weight of the value loss."""
    ent_coef: float = Field(0.0, ge=0)
    """c2: weight of the entropy bonus."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient-norm clip."""

    @property
    def clip_lo(self) -> float:
        """``clip_low`` resolved (``clip`` when empty)."""
        return self.clip if self.clip_low is None else self.clip_low

    @property
    def clip_hi(self) -> float:
        """``clip_high`` resolved (``clip`` when empty)."""
        return self.clip if self.clip_high is None else self.clip_high


class AlgoConfig(_Section):
    estimator: EstimatorName = "gae"
    """Advantage estimator (:mod:`ray_rlhf.algo.registry` lists each with what it needs). ``gae``:
    PPO with a value head and GAE (InstructGPT). Critic-free, over the samples of each prompt (no
    value head is built, run or saved): ``grpo`` (group-normalised reward, DeepSeekMath),
    ``dr_grpo`` (no std division, length-unbiased loss; Liu et al. 2025), ``rloo`` (leave-one-out
    baseline; Ahmadian et al. 2024). ``reinforce_pp``: REINFORCE++ (Hu 2025), batch-normalised
    returns with the KL in the reward, no critic either. The group ones need
    ``rollout.samples_per_prompt >= 2``."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount of the per-token rewards (GAE, REINFORCE++ returns)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """``gae``: normalize advantages to mean 0 / std 1 over the valid tokens of the batch."""
    drop_zero_std_groups: bool = False
    """Group estimators: leave out of the update the prompts whose samples all scored the same
    (their advantages are 0; they would only dilute the loss). Counted in ``adv/zero_std_groups``."""
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Correct for the sampler's log-probs differing from the learner's for the same weights
    (another engine, other kernels, another precision -- vLLM's bf16 kernels vs FSDP is the known
    cause of collapsing GPU runs), at any staleness. ``tis``: token-level truncated importance
    sampling, each token's loss weighted by min(pi_learner_old / pi_sampler,
    ``rollout_correction_cap``); ``mis``: sequence-level masking, a sequence whose geometric-mean
    ratio leaves [1/cap, cap] leaves the loss. Needs the learner's own pi_old (``ppo.old_logprobs``
    resolves to ``recompute``). Use it when ``rollout/mismatch_kl`` is not ~0 (bf16 engines or
    learners); on this fp32 CPU setup the two agree to ~1e-7 and it changes nothing."""
    rollout_correction_cap: float = Field(2.0, gt=1)
    """``tis``: the weight's cap; ``mis``: the bound C of the accepted ratio range [1/C, C]."""
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "auto"
    """How a minibatch's per-token losses become one number (verl's names; resolved by :attr:`agg`). ``token_mean``: sum
    over every valid token / the minibatch's token count (every token weighs the same);
    ``seq_mean_token_mean``: the mean over sequences of each sequence's token mean (DeepSeekMath's
    GRPO: short sequences' tokens weigh more); ``seq_mean_token_sum_norm``: each sequence's token
    sum / ``rollout.max_new_tokens``, averaged over sequences (Dr. GRPO's length-unbiased form).
    ``auto``: ``seq_mean_token_sum_norm`` for ``dr_grpo``, ``token_mean`` otherwise. Exact across
    micro-batches and learner ranks."""

    @property
    def agg(self) -> str:
        """``loss_agg`` resolved (``auto``: the estimator's own aggregation)."""
        return resolve_loss_agg(self.loss_agg, self.estimator)


class KLConfig(_Section):
    approx: Literal["auto", "k1", "k2", "k3"] = "auto"
    """Per-token KL estimator (Schulman's k1 = log(pi/ref), k2 = (log(pi/ref))^2 / 2, k3 =
    ref/pi - 1 - log(ref/pi)), used where the KL acts (``placement``) and in ``kl_ref``.
    ``auto``: ``k1`` in the reward penalty (unbiased), ``k3`` as a loss term (GRPO). ``k1`` as
    a loss term is refused: its gradient is zero in expectation."""
    beta: float = Field(0.05, ge=0)
    """Initial KL penalty coefficient."""
    adaptive: bool = False
    """Adaptive controller (Ziegler et al. 2019) instead of a fixed beta."""
    target: float = Field(6.0, gt=0)
    """Adaptive controller: target KL per sequence (nats)."""
    horizon: int = Field(10000, gt=0)
    """Adaptive controller: horizon in samples."""
    placement: Literal["auto", "reward", "loss"] = "auto"
    """Where the KL to the reference acts. ``reward``: -beta * KL per token in the reward
    (InstructGPT, REINFORCE++); ``loss``: beta * KL (``approx``, k3 by default, clamped to
    [-10, 10] per token) as a loss term (GRPO); ``auto``: ``reward`` for ``gae`` and
    ``reinforce_pp``, ``loss`` for the group estimators."""

    @property
    def reward_estimator(self) -> str:
        """``approx`` resolved for the per-token reward penalty and ``kl_ref`` (``auto``: k1)."""
        return "k1" if self.approx == "auto" else self.approx

    @property
    def loss_estimator(self) -> str:
        """``approx`` resolved for the KL loss term (``auto``: k3)."""
        return "k3" if self.approx == "auto" else self.approx


class LearnerConfig(_Section):
    device: str = "cpu"
    """Torch device of the learner (``cpu`` or ``cuda``)."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for the learner actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs for the learner actor."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per learner rank. Empty: the cores the phases leave it -- in a
    synchronous run the generators idle while the learner trains, so each rank takes its node's
    cores / ``learner.num``; in an asynchronous run they generate meanwhile, so each rank takes its
    reserved ``num_cpus`` (at least 1) and nothing is oversubscribed."""
    num: int = Field(1, ge=1)
    """Learner ranks (Ray actors in one torch.distributed group: gloo on CPU, NCCL on GPU). The
    update equals the one-rank update: every statistic is over the whole batch."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """``ddp``: every rank holds the whole model, gradients are all-reduced; ``fsdp``: FSDP2
    ``fully_shard`` (parameters, gradients and optimizer state sharded over the ranks)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training dtype. ``bfloat16`` (GPU): bf16 compute with float32 master weights, gradients and
    optimizer state -- FSDP2's mixed-precision policy for ``fsdp`` with several ranks, autocast
    otherwise (``ddp``, or one rank) and for the frozen reference; log-probs and values are computed in float32 from the bf16
    trunk. On CPU it runs (autocast) but is fast only where the CPU has bf16 instructions
    (AVX-512-BF16/AMX). Where the engine samples in another precision, watch
    ``rollout/mismatch_kl`` and consider ``algo.rollout_correction``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    compile: bool = False
    """``torch.compile`` every decoder layer of the policy and the reference (dynamic shapes):
    fuses the norms, rotary embedding and activation functions, the non-matmul work of a step.
    The first step pays the compilation (~25 s for the ``small`` model on 2 CPU cores; torch
    caches it for later runs on the node); on CPU it needs a C++ compiler on the learner's node."""
    shard_reference: bool = False
    """``fsdp`` with several ranks: shard the frozen reference with FSDP2 like the policy (each rank
    holds 1/``num`` of it; its parameters are all-gathered for each reference pass). Off: every
    rank holds a full copy (no communication for the reference). Measured with 2 ranks on the
    tiny model: 3.67 of 7.35 MB of reference parameters per rank."""
    pin_cores: bool = False
    """Pin each rank to its own cores (a CPU placement for benchmarks; off on shared machines)."""
    collective_timeout_s: float = Field(300.0, gt=0)
    """A rank that waits longer than this in a collective (a peer died) fails the step."""
    max_restarts: int = Field(2, ge=0)
    """Times in a run the learner group is restarted from the newest checkpoint after a rank
    died, before the run gives up."""


class LoraConfig(_Section):
    rank: int = Field(0, ge=0)
    """LoRA rank r of the policy's adapters (Hu et al. 2021: W + (alpha / r) B A, B (out, r) zero at
    start, A (r, in)); 0 = off (full fine-tuning). With r > 0 the policy trunk is frozen and only the
    adapters (and the value head, fully) train; the reference is the same model with the adapters
    disabled (no second copy of the weights). Built with ``peft``
    (:mod:`ray_rlhf.learning.lora`)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha: the adapters' update is scaled by alpha / rank."""
    target_modules: list[str] | None = None
    """Names (or name suffixes, ``peft``'s matching) of the linear modules that get adapters, e.g.
    ``[q_proj, v_proj]``. Empty: every linear layer of the decoder trunk (attention and MLP
    projections of any architecture; not the LM head or the value head). A name matching none of the
    model's linear modules is refused before the run starts, naming the ones it has."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input during the update (0: off; any other value makes the first
    PPO ratio differ from 1, as the log-probs of pi_old are computed without it)."""
    sync: Literal["auto", "merged", "adapter"] = "auto"
    """How the trained policy reaches the generators. ``merged``: the learner merges W + (alpha / r)
    B A in float32 and sends the full state dict under the base model's names through ``sync.backend``,
    verified like any sync. ``adapter``: the learner sends the adapter tensors alone (and their rank,
    alpha and target modules); each generator's vLLM engine, started with LoRA
    (``generators.max_lora_rank``), serves them as a new adapter, verified by a read-back checksum and
    a log-prob probe (:mod:`ray_rlhf.sync.adapter`); needs ``sync.backend=object_store``. ``auto``:
    ``merged`` (docs/lora.md says why)."""

    @property
    def resolved_sync(self) -> str:
        """``sync`` resolved: ``merged`` or ``adapter`` (``auto``: ``merged``)."""
        return "adapter" if self.sync == "adapter" else "merged"


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM 0.32 accepts (``vllm.config.lora.MaxLoRARanks``; a unit test
checks this copy against the installed vLLM)."""


def engine_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves adapters of ``rank``; the largest
    (512) when ``rank`` is above every one (the config refuses that)."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])
