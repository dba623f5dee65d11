"""The one typed config tree of a run.

Every field has a docstring; sizes derived from several fields are checked in
:meth:`RunConfig._check_combinations` and nowhere else. Load a tree with
:func:`ray_rlhf.config.load_config` (YAML preset or file plus dotted overrides).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    policy_path: str | None = None
    """Hugging Face directory of the initial policy (causal LM). Empty: build the offline
    ``preset`` model (random init) into ``cache_dir`` once and use it."""
    preset: str = "tiny"
    """Offline model preset used when ``policy_path`` is empty (see ``ray-rlhf make-model``)."""
    init_seed: int = Field(0, ge=0)
    """Seed of the offline model's random init."""
    cache_dir: str = "runs/models"
    """Where offline models are built (once) and reused."""
    critic_path: str | None = None
    """Optional separate critic trunk (causal LM directory). Empty: the value head sits on the
    policy's own trunk (InstructGPT-style shared trunk)."""


class DataConfig(_Section):
    prompts_path: str | None = None
    """Parquet or JSONL prompt file. Empty: the bundled prompt set."""
    prompt_column: str = "prompt"
    """Column (Parquet) or field (JSONL) holding the prompt text."""
    max_prompt_tokens: int = Field(48, gt=0)
    """Longest prompt accepted, in tokens; a longer prompt is an error before training starts."""


class RolloutConfig(_Section):
    prompts_per_step: int = Field(16, gt=0)
    """Prompts drawn from the dataset per PPO step."""
    samples_per_prompt: int = Field(4, gt=0)
    """Completions sampled per prompt (vLLM ``n``)."""
    max_new_tokens: int = Field(24, gt=0)
    """Maximum response length in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. PPO's ratio assumes the learner scores the same distribution the
    sampler drew from: keep 1.0 unless you know why not."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1.0 = off)."""

    @property
    def batch_size(self) -> int:
        """Sequences per PPO step: prompts_per_step * samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt


class GeneratorsConfig(_Section):
    num: int = Field(2, ge=1)
    """Generator actors started at launch."""
    min: int | None = Field(None, ge=1)
    """Fewest generators the run carries on with (elastic pool). Empty: ``num``."""
    max: int | None = Field(None, ge=1)
    """Most generators the pool grows to when the cluster has room. Empty: ``num``."""
    num_cpus: float = Field(0.5, ge=0)
    """CPUs reserved per generator actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per generator actor (set to ``tensor_parallel_size`` on GPU clusters)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallelism inside one generator."""
    kv_cache_gib: float = Field(1.0, gt=0)
    """vLLM KV-cache size on CPU (GiB, VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM GPU memory fraction (GPU clusters only)."""
    shard_prompts: int = Field(4, ge=1)
    """Prompts per work-queue shard: smaller shards balance better, larger ones batch better."""
    max_model_len: int = Field(256, gt=0)
    """vLLM context length: prompt plus response must fit."""
    max_restarts: int = Field(3, ge=0)
    """Replacements started for dead generators before the run gives up."""


class RewardFunctionSpec(_Section):
    name: str
    """``module:function`` taking (prompt, response) and returning a float."""
    weight: float = 1.0
    """Weight of this function in the summed reward."""


class RewardConfig(_Section):
    functions: list[RewardFunctionSpec] = Field(
        default_factory=lambda: [RewardFunctionSpec(name="ray_rlhf.rewards.rules:letter_frequency")]
    )
    """Python reward functions, summed with their weights."""
    model_path: str | None = None
    """Hugging Face sequence-classification reward model directory (num_labels=1). Empty: none."""
    model_weight: float = 1.0
    """Weight of the reward model's score in the summed reward."""
    batch_size: int = Field(32, gt=0)
    """Sequences per reward-model forward pass."""
    num_cpus: float = Field(0.25, ge=0)
    """CPUs reserved for the reward actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs for the reward actor."""


class PPOConfig(_Section):
    epochs: int = Field(2, ge=1)
    """Passes over each rollout batch."""
    minibatch_size: int = Field(32, gt=0)
    """Sequences per optimizer step."""
    micro_batch_size: int = Field(16, gt=0)
    """Sequences per forward/backward pass (gradient accumulation inside a minibatch)."""
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate (policy trunk, LM head and value head)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    clip: float = Field(0.2, gt=0)
    """PPO ratio clip epsilon."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 for negative advantages (empty: off)."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip of the value prediction around the old values (empty: off)."""
    vf_coef: float = Field(0.1, ge=0)
    """c1: weight of the value loss."""
    ent_coef: float = Field(0.0, ge=0)
    """c2: weight of the entropy bonus."""
    gamma: float = Field(1.0, gt=0, le=1)
    """GAE discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient-norm clip."""
    whiten_advantages: bool = True
    """Normalize advantages to mean 0 / std 1 over the valid tokens of the batch."""


class KLConfig(_Section):
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator used in the reward penalty."""
    beta: float = Field(0.05, ge=0)
    """Initial KL penalty coefficient."""
    adaptive: bool = False
    """Adaptive controller (Ziegler et al. 2019) instead of a fixed beta."""
    target: float = Field(6.0, gt=0)
    """Adaptive controller: target KL per sequence (nats)."""
    horizon: int = Field(10000, gt=0)
    """Adaptive controller: horizon in samples."""


class LearnerConfig(_Section):
    device: str = "cpu"
    """Torch device of the learner (``cpu`` or ``cuda``)."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved for the learner actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs for the learner actor."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads in the learner (empty: torch's default)."""


class SyncConfig(_Section):
    backend: Literal["object_store", "collective"] = "object_store"
    """Weight broadcast: one ``ray.put`` pulled by every generator, or a torch.distributed
    broadcast (gloo on CPU, NCCL on GPU)."""
    verify: bool = True
    """Compare every generator's weight checksum with the learner's after each sync."""


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0)
    """Checkpoint every this many steps (0: only at the end)."""
    keep: int = Field(2, ge=1)
    """Newest complete checkpoints kept."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint of ``output_dir`` if any;
    ``never``: start fresh (refuses a dir that already has checkpoints); or a checkpoint path."""


class LoggingConfig(_Section):
    tensorboard: bool = True
    """Write TensorBoard scalars to ``output_dir/tensorboard``."""
    progress_bar: bool = True
    """Show a progress bar on the console."""
    rollouts: bool = True
    """Write every completion with its reward to ``output_dir/rollouts`` (Parquet)."""


class KillGenerator(_Section):
    step: int = Field(ge=1)
    """Step during whose rollout the generator is killed."""
    index: int = Field(0, ge=0)
    """Which generator (position in the pool)."""


class FaultsConfig(_Section):
    kill_generator: list[KillGenerator] = Field(default_factory=list)
    """Fault injection: kill generator ``index`` during the rollout of ``step``."""
    stop_after_step: int | None = Field(None, ge=1)
    """Fault injection: exit (as if preempted) right after this step's checkpoint."""
    kill_reward_at_step: int | None = Field(None, ge=1)
    """Fault injection: ``ray.kill`` the reward actor (Ray restarts it) just before this step's scoring."""


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster to join. Empty: ``RAY_ADDRESS`` if set, else start a local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray (empty: all)."""


class RunConfig(_Section):
    name: str = "run"
    """Run name (used in the default output directory)."""
    seed: int = Field(0, ge=0)
    """Seed of data order, sampling and the learner."""
    steps: int = Field(20, ge=1)
    """PPO steps (rollout + update cycles) in the run."""
    output_dir: str = "runs/run"
    """Metrics, TensorBoard, rollouts and checkpoints go here."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    generators: GeneratorsConfig = Field(default_factory=GeneratorsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> "RunConfig":
        """Impossible combinations of otherwise valid values, each naming its keys."""
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
        need = self.data.max_prompt_tokens + r.max_new_tokens
        if need > g.max_model_len:
            raise ValueError(
                f"data.max_prompt_tokens + rollout.max_new_tokens = {need} exceeds "
                f"generators.max_model_len={g.max_model_len}; raise it or shorten prompts/responses"
            )
        if self.faults.kill_reward_at_step and self.faults.kill_reward_at_step > self.steps:
            raise ValueError(f"faults.kill_reward_at_step={self.faults.kill_reward_at_step} is after the last step ({self.steps})")
        for kill in self.faults.kill_generator:
            if kill.step > self.steps:
                raise ValueError(f"faults.kill_generator step {kill.step} is after the last step ({self.steps})")
        if self.checkpoint.resume not in ("auto", "never") and not self.checkpoint.resume.strip():
            raise ValueError("checkpoint.resume must be 'auto', 'never' or a checkpoint directory")
        return self

    @property
    def pool_min(self) -> int:
        """Fewest generators (``generators.min`` or ``num``)."""
        return self.generators.min or self.generators.num

    @property
    def pool_max(self) -> int:
        """Most generators (``generators.max`` or ``num``)."""
        return self.generators.max or self.generators.num
