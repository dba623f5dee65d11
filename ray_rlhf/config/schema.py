"""The one typed config tree of a run (the sections live in :mod:`.inputs`, :mod:`.training` and
:mod:`.operations`).

Every field has a docstring; sizes derived from several fields are checked in
:meth:`RunConfig._check_combinations` and nowhere else. Load a tree with
:func:`ray_rlhf.config.load_config` (YAML preset or file plus dotted overrides).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ray_rlhf.algo.registry import critic_estimators, get_estimator, group_estimators, resolve_kl_in_loss
from ray_rlhf.config.base import _Section
from ray_rlhf.config.inputs import (
    DataConfig,
    EnvConfig,
    GeneratorsConfig,
    ModelConfig,
    RemoteRewardSpec,
    RewardConfig,
    RewardFunctionSpec,
    RolloutConfig,
)
from ray_rlhf.config.operations import CheckpointConfig, FaultsConfig, KillGenerator, LoggingConfig, RayConfig, SyncConfig
from ray_rlhf.config.training import (
    VLLM_LORA_RANKS,
    AlgoConfig,
    KLConfig,
    LearnerConfig,
    LoraConfig,
    PPOConfig,
    engine_lora_rank,
)

__all__ = [
    "RunConfig",
    "ModelConfig",
    "DataConfig",
    "RolloutConfig",
    "EnvConfig",
    "GeneratorsConfig",
    "RewardFunctionSpec",
    "RemoteRewardSpec",
    "RewardConfig",
    "PPOConfig",
    "AlgoConfig",
    "KLConfig",
    "LearnerConfig",
    "LoraConfig",
    "SyncConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "KillGenerator",
    "FaultsConfig",
    "RayConfig",
]


class RunConfig(_Section):
    name: str = "run"
    """Run name (used in the default output directory)."""
    seed: int = Field(0, ge=0)
    """Seed of data order, sampling and the learner."""
    steps: int = Field(20, ge=1)
    """PPO steps (rollout + update cycles) in the run."""
    output_dir: str = "runs/run"
    """Metrics, TensorBoard, rollouts and checkpoints go here."""
    placement: Literal["split", "colocated"] = "split"
    """Where the generators and the learner ranks run. ``split``: each actor is placed on its own
    (own GPUs, or CPU shares). ``colocated``: one placement group of ``learner.num`` bundles; bundle
    ``i`` holds generator ``i`` and learner rank ``i`` (``generators.num_gpus + learner.num_gpus``
    of one GPU, e.g. 0.5 + 0.5); the engines sleep while the learner trains and the learner offloads
    its optimizer state and gradients while the engines generate (:mod:`ray_rlhf.run.placement`).
    Needs ``generators.num == learner.num``, a fixed pool, ``rollout.max_staleness=0`` and, on GPUs,
    ``sync.backend=object_store`` (:func:`ray_rlhf.preflight.check_placement`); the
    per-GPU memory budget is checked before start (:mod:`ray_rlhf.budget`)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    generators: GeneratorsConfig = Field(default_factory=GeneratorsConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> "RunConfig":
        """Impossible combinations of otherwise valid values, each naming its keys: sizes here, the
        algorithm's in :meth:`_check_algorithm`."""
        r, p, g = self.rollout, self.ppo, self.generators
        if p.minibatch_size > r.batch_size:
            raise ValueError(
                f"ppo.minibatch_size={p.minibatch_size} is larger than the batch "
                f"(rollout.prompts_per_step * rollout.samples_per_prompt = {r.batch_size}); "
                "lower ppo.minibatch_size or raise the batch"
            )
        if r.batch_size % p.minibatch_size:
            raise ValueError(
                f"ppo.minibatch_size={p.minibatch_size} must divide the batch of {r.batch_size} sequences"
            )
        if p.micro_batch_size > p.minibatch_size or p.minibatch_size % p.micro_batch_size:
            raise ValueError(
                f"ppo.micro_batch_size={p.micro_batch_size} must divide ppo.minibatch_size={p.minibatch_size}"
            )
        lo, hi = g.min or g.num, g.max or g.num
        if not lo <= g.num <= hi:
            raise ValueError(
                f"generators.min ({lo}) <= generators.num ({g.num}) <= generators.max ({hi}) does not hold"
            )
        if r.top_p < 1:
            raise ValueError(
                f"rollout.top_p={r.top_p} is not supported: vLLM would sample from the renormalised nucleus while "
                "the learner scores the full distribution (off-policy ratios); set rollout.top_p=1.0"
            )
        if g.tensor_parallel_size > 1 and self.sync.verify:
            raise ValueError(
                f"sync.verify cannot read back weights sharded over generators.tensor_parallel_size="
                f"{g.tensor_parallel_size} ranks yet; set sync.verify=false"
            )
        need = self.data.max_prompt_tokens + r.max_new_tokens
        if need > g.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens + rollout.max_new_tokens = {need} exceeds "
                f"generators.max_model_len={g.max_model_len}; raise it or shorten prompts/responses"
            )
        if r.max_total_tokens is not None and r.max_total_tokens > g.max_model_len:
            raise ValueError(f"rollout.max_total_tokens={r.max_total_tokens} exceeds generators.max_model_len="
                             f"{g.max_model_len}; raise generators.max_model_len or lower rollout.max_total_tokens")
        if self.env.name and self.env.agent:
            raise ValueError(f"env.name={self.env.name} and env.agent={self.env.agent} are both set; an environment "
                             "or an OpenAI-client agent answers the model, not both: keep one")
        if self.env.agent and self.env.num_cpus:
            raise ValueError(f"env.num_cpus={self.env.num_cpus} runs environments (env.name) in actors of their own; "
                             "an env.agent runs in the generator: unset env.num_cpus")
        for key, events in self.faults:
            for event in events:
                if event.step > self.steps:
                    raise ValueError(f"faults.{key} step {event.step} is after the last step ({self.steps})")
        if self.checkpoint.resume not in ("auto", "never") and not self.checkpoint.resume.strip():
            raise ValueError("checkpoint.resume must be 'auto', 'never' or a checkpoint directory")
        self._check_algorithm()
        self._check_lora()
        return self

    def _check_lora(self) -> None:
        """What LoRA (``lora.rank > 0``) does not run with yet, each naming its keys."""
        lo, lc = self.lora, self.learner
        if not lo.rank:
            return
        if lo.resolved_sync == "adapter":
            self._check_adapter_sync()
        if lc.strategy == "fsdp" and lc.num > 1 and lo.resolved_sync == "adapter":
            raise ValueError("lora.sync=adapter with learner.strategy=fsdp is not supported yet (the adapters and "
                             "the probe are read from unsharded weights); set lora.sync=merged or learner.strategy=ddp")
        if self.model.critic_path:
            raise ValueError("lora.rank > 0 adapts the policy only; a separate critic (model.critic_path) is not "
                             "supported with it yet: unset model.critic_path")

    def _check_adapter_sync(self) -> None:
        """``lora.sync=adapter``: the engines' ``max_lora_rank`` serves ``lora.rank``; object store only."""
        lo, g = self.lora, self.generators
        ranks = ", ".join(map(str, VLLM_LORA_RANKS))
        if g.max_lora_rank is not None and g.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"generators.max_lora_rank={g.max_lora_rank} is not one vLLM accepts ({ranks}); "
                             f"set one of them (or leave it empty: lora.rank rounded up)")
        engine = self.engine_max_lora_rank
        if lo.rank > engine:
            raise ValueError(f"lora.rank={lo.rank} is larger than the engines' max_lora_rank={engine} "
                             f"(generators.max_lora_rank), so vLLM cannot serve the adapters; set "
                             f"generators.max_lora_rank to {engine_lora_rank(lo.rank)} or more (one of {ranks}), "
                             f"or lower lora.rank, or set lora.sync=merged")
        if self.sync.backend != "object_store":
            raise ValueError("lora.sync=adapter sends the adapters with their config through the object store; "
                             "set sync.backend=object_store (or lora.sync=merged)")

    @property
    def engine_max_lora_rank(self) -> int | None:
        """The generators' vLLM ``max_lora_rank`` (``lora.sync=adapter``; ``generators.max_lora_rank`` or
        ``lora.rank`` rounded up to what vLLM accepts); None: the engines run without LoRA."""
        if not self.lora.rank or self.lora.resolved_sync != "adapter":
            return None
        return self.generators.max_lora_rank or engine_lora_rank(self.lora.rank)

    def _check_partial(self) -> None:
        """``rollout.partial=true`` only where a generator can take new weights mid-step."""
        r = self.rollout
        if not r.partial:
            return
        if not r.max_staleness:
            raise ValueError("rollout.partial=true interrupts a step's generation when newer weights arrive, but with "
                             "rollout.max_staleness=0 no weights arrive during generation (nothing to interrupt); set "
                             "rollout.max_staleness >= 1 or rollout.partial=false")
        if self.env.agent:
            raise ValueError("rollout.partial=true is not supported with env.agent (an agent's requests cannot be "
                             "resumed under new weights yet); set rollout.partial=false")
        if self.env.multi_turn:
            raise ValueError("rollout.partial=true supports single-turn rollouts only, not multi-turn env.name runs; "
                             "set rollout.partial=false or unset env.name")
        if self.lora.rank and self.lora.resolved_sync == "adapter":
            raise ValueError("rollout.partial=true loads full weights between engine steps; lora.sync=adapter is not "
                             "supported: set lora.sync=merged or rollout.partial=false")

    def _check_algorithm(self) -> None:
        """Impossible combinations of the estimator, the loss and the rollout's options."""
        r, p = self.rollout, self.ppo
        estimator = get_estimator(self.algo.estimator)
        if estimator.needs_groups and r.samples_per_prompt < 2:
            raise ValueError(
                f"algo.estimator={self.algo.estimator} compares the samples of each prompt: it needs "
                f"rollout.samples_per_prompt >= 2 (got {r.samples_per_prompt})"
            )
        if not estimator.uses_critic and self.model.critic_path:
            raise ValueError(f"model.critic_path is set but algo.estimator={self.algo.estimator} uses no critic; "
                             f"unset model.critic_path or use algo.estimator={' or '.join(critic_estimators())}")
        if r.max_staleness and self.sync.backend != "object_store":
            raise ValueError("rollout.max_staleness >= 1 loads new weights into each generator between its rollout "
                             "steps, through the object store; set sync.backend=object_store")
        self._check_partial()
        if self.learner.num > 1 and p.minibatch_size < self.learner.num:
            raise ValueError(f"ppo.minibatch_size={p.minibatch_size} is smaller than learner.num={self.learner.num}: "
                             "every learner rank needs at least one sequence of each minibatch")
        if p.clip_lo > p.clip_hi:
            raise ValueError(f"ppo.clip_low={p.clip_lo} is larger than ppo.clip_high={p.clip_hi}: the clip range would "
                             "favour shrinking probabilities; set ppo.clip_high >= ppo.clip_low (DAPO: 0.2 and 0.28)")
        if r.max_staleness and p.old_logprobs == "sampler":
            raise ValueError(f"ppo.old_logprobs=sampler with rollout.max_staleness={r.max_staleness} makes pi_old the "
                             "stale sampler itself, so the staleness correction would silently vanish; set "
                             "ppo.old_logprobs=auto (or recompute)")
        if self.algo.rollout_correction != "none" and p.old_logprobs == "sampler":
            raise ValueError(f"algo.rollout_correction={self.algo.rollout_correction} compares the learner's log-probs "
                             "with the sampler's; ppo.old_logprobs=sampler leaves none to compare: set "
                             "ppo.old_logprobs=auto (or recompute)")
        if self.kl_in_loss and self.kl.loss_estimator == "k1":
            raise ValueError("kl.approx=k1 as a loss term (kl.placement=loss, or auto with a group estimator) has a "
                             "gradient that is zero in expectation; set kl.approx=k3 (or k2, or auto)")
        if r.overlong == "penalty" and not 0 < r.overlong_buffer < r.max_new_tokens:
            raise ValueError(f"rollout.overlong=penalty needs 0 < rollout.overlong_buffer < rollout.max_new_tokens "
                             f"({r.max_new_tokens}); got rollout.overlong_buffer={r.overlong_buffer}")
        if r.ignore_eos and r.overlong != "keep":
            raise ValueError(f"rollout.ignore_eos=true makes every response max_new_tokens long, so "
                             f"rollout.overlong={r.overlong} would treat all of them as overlong; set rollout.overlong=keep "
                             "or rollout.ignore_eos=false")
        if r.overlong_buffer >= r.max_new_tokens:
            raise ValueError(f"rollout.overlong_buffer={r.overlong_buffer} must be smaller than "
                             f"rollout.max_new_tokens={r.max_new_tokens}")
        if r.dynamic_sampling and not estimator.needs_groups:
            raise ValueError(f"rollout.dynamic_sampling keeps prompts whose samples' rewards differ, which only a group "
                             f"estimator uses; algo.estimator={self.algo.estimator} has no groups: use one of "
                             f"{', '.join(group_estimators())} or set rollout.dynamic_sampling=false")

    @property
    def uses_critic(self) -> bool:
        """Whether a value function is built, trained and saved (an estimator with a critic: ``gae``)."""
        return get_estimator(self.algo.estimator).uses_critic

    @property
    def kl_in_loss(self) -> bool:
        """``kl.placement`` resolved: True for a k3 loss term, False for a per-token reward penalty."""
        return resolve_kl_in_loss(self.kl.placement, self.algo.estimator)

    @property
    def old_logprobs_from_sampler(self) -> bool:
        """``ppo.old_logprobs`` resolved (see its docstring)."""
        if self.ppo.old_logprobs != "auto":
            return self.ppo.old_logprobs == "sampler"
        trunk_values = self.uses_critic and not self.model.critic_path
        return self.rollout.max_staleness == 0 and not trunk_values and self.algo.rollout_correction == "none"

    @property
    def pool_min(self) -> int:
        """Fewest generators (``generators.min`` or ``num``)."""
        return self.generators.min or self.generators.num

    @property
    def pool_max(self) -> int:
        """Most generators (``generators.max`` or ``num``)."""
        return self.generators.max or self.generators.num
