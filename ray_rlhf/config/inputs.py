"""Config sections of what a run reads and produces: model, data, rollout, generators, reward."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ray_rlhf.config.base import _Section


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
    """Parquet or JSONL prompt file, or ``bundled:prompts`` / ``bundled:letters`` (the bundled
    sets). Empty: ``bundled:prompts``. Every column besides ``prompt_column`` travels with its
    prompt to the reward functions (as keyword arguments) and to the rollout log."""
    prompt_column: str = "prompt"
    """Column (Parquet) or field (JSONL) holding the prompt: text, or chat messages (a list of
    ``{role, content}``)."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """``auto``: apply the tokenizer's chat template (with the generation prompt) to chat
    messages, leave text as it is; ``always``: also wrap each text prompt as one user message;
    ``never``: plain text only (chat messages are an error)."""
    system_prompt: str | None = None
    """Put first, as a system message, in every templated prompt that has none."""
    max_prompt_tokens: int = Field(48, gt=0)
    """Longest prompt accepted, in tokens after templating; a longer prompt is an error before
    training starts."""


class RolloutConfig(_Section):
    prompts_per_step: int = Field(16, gt=0)
    """Prompts drawn from the dataset per PPO step."""
    samples_per_prompt: int = Field(4, gt=0)
    """Completions sampled per prompt (vLLM ``n``)."""
    max_new_tokens: int = Field(24, gt=0)
    """Maximum response length in tokens."""
    ignore_eos: bool = False
    """Keep sampling past the end-of-sequence token (vLLM's ``ignore_eos``): every response is
    exactly ``max_new_tokens`` long and finishes with reason ``length``. For benchmarks that
    must do fixed work (TRL's PPO generates fixed lengths); training normally leaves it off."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. PPO's ratio assumes the learner scores the same distribution the
    sampler drew from: keep 1.0 unless you know why not."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass. Only 1.0 is accepted: with top_p < 1 vLLM samples from (and
    reports the log-probs of) the renormalised nucleus, while the learner scores the full
    distribution, so PPO's ratio would compare different distributions."""

    overlong: Literal["keep", "mask", "penalty"] = "keep"
    """Responses that hit ``max_new_tokens`` without a stop token (finish reason ``length``).
    ``keep``: scored like any other; ``mask``: left out of the loss (DAPO's overlong filtering: a
    truncated answer's reward says little about its tokens); ``penalty``: DAPO's soft overlong
    punishment added to the score, 0 up to ``max_new_tokens - overlong_buffer`` tokens, then
    falling linearly to -1 at ``max_new_tokens``."""
    overlong_buffer: int = Field(0, ge=0)
    """``overlong=penalty``: the length of the linear penalty zone in tokens (DAPO's L_cache);
    must be > 0 and < ``max_new_tokens`` with ``penalty``."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (group estimators): drop the prompts whose samples all scored the
    same and keep sampling further prompts until the step holds ``prompts_per_step`` prompts with
    non-zero reward variance, at most ``max_sampling_rounds`` rounds (then it trains on what it
    has). Costs extra generation; the update sees only informative groups."""
    max_sampling_rounds: int = Field(3, ge=1)
    """``dynamic_sampling``: most generation rounds per step."""

    max_total_tokens: int | None = Field(None, gt=0)
    """Multi-turn runs (``env.name`` set): the longest trajectory in tokens, the prompt plus every
    model turn and every observation appended between turns. A trajectory that reaches it ends
    with finish reason ``max_total_tokens``. Empty: ``generators.max_model_len``. Must be at least
    the longest prompt (checked before start)."""

    max_staleness: int = Field(0, ge=0)
    """Asynchronous PPO: how many versions the learner may be ahead of the weights that sampled a
    batch. 0: the synchronous loop. k >= 1: the next batches are generated while the learner
    trains; no sample is trained on by a learner more than k versions newer than its sampler."""
    partial: bool = False
    """Interruptible generation (needs ``max_staleness >= 1``, single-turn rollouts, full-weight
    sync): when the learner stages new weights while a step is being generated, each generator
    takes them at its next engine step -- its in-flight requests are aborted, the weights loaded and
    verified, the prefix cache reset, and each unfinished request resumed with its prompt plus the
    tokens sampled so far as the new prompt (re-prefilled under the new weights, its remaining
    ``max_new_tokens`` reduced, a per-segment seed derived from its own). Every response token keeps
    the version that sampled it and its log-prob under that version (``token_versions`` in the
    rollout log), so the off-policy correction stays exact and the per-token staleness stays within
    ``max_staleness``. Where a step is interrupted depends on timing, so a run with ``partial=true``
    is not reproducible sample for sample (``false``: the fixed-lag schedule, reproducible)."""

    @property
    def batch_size(self) -> int:
        """Sequences per PPO step: prompts_per_step * samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt


class EnvConfig(_Section):
    name: str | None = None
    """``module:Class`` of the environment (:class:`ray_rlhf.envs.base.Env`) that answers the model
    turn by turn: each trajectory gets its own instance, ``reset`` with the prompt row's columns,
    then ``step`` with each model turn's text. Empty: single-turn rollouts (no environment). Bundled:
    ``ray_rlhf.envs.letters:LetterGame``; tools: a subclass of ``ray_rlhf.envs.tools:ToolEnv``."""
    agent: str | None = None
    """``module:function`` of an agent written against the OpenAI client, ``async def rollout(client,
    row) -> reward`` (instead of ``env.name``): each rollout gets an ``openai.AsyncOpenAI`` client
    whose chat completions the generator serves and records token in, token out
    (:mod:`ray_rlhf.generation.openai_endpoint`); the returned reward lands on the last model token."""
    kwargs: dict = Field(default_factory=dict)
    """Keyword arguments of the environment's constructor, or of the ``env.agent`` function's
    calls (plain YAML values)."""
    max_turns: int = Field(4, gt=0)
    """Most model turns per trajectory; one that reaches it without the environment saying ``done``
    ends with finish reason ``max_turns`` (an agent's next request is refused)."""
    step_timeout_s: float = Field(30.0, gt=0)
    """Seconds one ``reset`` or ``step`` call may take (an ``env.agent``: its own time before a request,
    between a completion and its next request, after its last); past it (or when it raises) the trajectory
    ends with finish reason ``env_error`` (a log line and the ``env/errors`` metric) and the run goes on."""
    num_cpus: float | None = Field(None, ge=0)
    """CPUs of each environment actor. Empty or 0: environments run inside the generator actor (plain
    Python). Above 0 (heavy or sandboxed environments): each generator starts ``env.num_actors``
    Ray actors of this many CPUs, each holding the environments of many trajectories
    (:mod:`ray_rlhf.envs.remote`); an actor that dies ends its trajectories with ``env_error`` and is
    replaced for the next shard. Not with ``env.agent``."""
    num_actors: int = Field(1, ge=1)
    """``env.num_cpus`` > 0: environment actors per generator; trajectories are spread over them
    round robin."""
    scheduling: Literal["turns", "continuous"] = "continuous"
    """How an ``env.name`` shard's trajectories share the engine. ``turns``: one engine call samples the
    next turn of every live trajectory, then all environments step (the engine idles meanwhile).
    ``continuous``: each trajectory's turn is added to the running engine as soon as its observation
    is ready, while the engine keeps decoding the others (``perf/engine_busy_fraction``). Same
    trajectories either way (per-turn seeds). ``env.agent`` requests are batched by the endpoint."""

    @property
    def multi_turn(self) -> bool:
        """An environment or an agent answers the model: rollouts are trajectories."""
        return bool(self.name or self.agent)


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
    max_lora_rank: int | None = Field(None, ge=1)
    """``lora.sync=adapter``: the largest adapter rank the engines serve (vLLM's ``max_lora_rank``:
    one of 1, 8, 16, 32, 64, 128, 256, 320, 512). Empty: ``lora.rank`` rounded up to the next of
    them. A ``lora.rank`` above it is refused before the run starts. Unused without adapter sync."""
    omp_threads_bind: str = Field("nobind", pattern=r"^(nobind|auto|\d+(-\d+)?(,\d+(-\d+)?)*)$")
    """CPU engines' cores: ``nobind`` (the OS spreads the engines over the cores), ``auto`` (vLLM's
    own binding) or a core list such as ``"1"`` or ``"2-3"`` that every generator process is pinned
    to (with ``learner.pin_cores``: generation and training on disjoint cores, as the benchmark of
    asynchronous PPO runs them)."""

    @field_validator("omp_threads_bind", mode="before")
    @classmethod
    def _core_number(cls, v):
        return str(v) if isinstance(v, int) else v  # `omp_threads_bind=1` on the command line is YAML's 1
    preload: list[str] = Field(default_factory=list)
    """Shared libraries put in the generator processes' ``LD_PRELOAD`` (through the actors' Ray
    runtime environment), e.g. the allocator and OpenMP vLLM's CPU guide recommends:
    ``[/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4, <venv>/lib/libiomp5.so]`` (Debian's
    ``libtcmalloc-minimal4``, PyPI's ``intel-openmp``). Empty by default: on an AMD EPYC (AVX2,
    2 cores) neither changed generation tokens/s beyond noise; measure yours with
    ``ray-rlhf bench --sweep``. Paths must exist on every generator node."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM GPU memory fraction (GPU clusters only)."""
    shard_prompts: int = Field(4, ge=1)
    """Prompts per work-queue shard: smaller shards balance better, larger ones batch better."""
    max_model_len: int = Field(256, gt=0)
    """vLLM context length: prompt plus response must fit."""
    max_restarts: int = Field(3, ge=0)
    """Replacements started for dead or hung generators before the run gives up."""
    shard_timeout_s: float | None = Field(None, gt=0)
    """A shard not finished after this long counts its generator as hung: the shard is re-queued
    and the generator replaced. Empty: 4x the shard's token budget at the last measured seconds
    per token, at least ``shard_timeout_floor_s``."""
    shard_timeout_floor_s: float = Field(60.0, gt=0)
    """The smallest automatic shard deadline (and the deadline until a shard has been timed)."""


class RewardFunctionSpec(_Section):
    name: str
    """``module:function``; it receives the prompt row's other columns as keyword arguments."""
    weight: float = 1.0
    """Weight of this function in the summed reward."""
    kind: Literal["sample", "batch"] = "sample"
    """``sample``: ``fn(prompt, response, **columns) -> float``, called per completion;
    ``batch``: ``fn(prompts, responses, **columns) -> list[float]``, called once per step with
    lists. Either may be ``async def``."""


class RemoteRewardSpec(_Section):
    url: str
    """HTTP(S) endpoint scoring a batch: POST ``{"prompts", "responses", "columns"}``, answer
    ``{"rewards": [...]}`` (an LLM judge or a verifier service)."""
    weight: float = 1.0
    """Weight of its score in the summed reward."""
    timeout_s: float = Field(30.0, gt=0)
    """Seconds per attempt (connect, send, each read)."""
    retries: int = Field(2, ge=0)
    """Extra attempts after a connection failure, a timeout or a 408/429/5xx answer."""


class RewardConfig(_Section):
    functions: list[RewardFunctionSpec] = Field(
        default_factory=lambda: [RewardFunctionSpec(name="ray_rlhf.rewards.rules:letter_frequency")]
    )
    """Python reward functions, summed with their weights."""
    remote: list[RemoteRewardSpec] = Field(default_factory=list)
    """Remote reward services (each scores the whole batch in one request)."""
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
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads of the reward actor (the reward model's forward). Empty: the cores
    the phases leave it -- in a synchronous run scoring runs alone, between generation and the
    update, so it takes its node's cores; in an asynchronous run generation goes on meanwhile, so it
    takes its reserved ``num_cpus`` (at least 1)."""
