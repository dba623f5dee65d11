"""Typed records passed between actors.

A prompt travels as a :class:`PromptItem`, a completion comes back from a generator as a
:class:`Rollout`, the reward actor fills :attr:`Rollout.reward`, and the learner turns a list of
rollouts into a padded :class:`TensorBatch`. Rollouts are logged to Parquet with
:data:`ROLLOUT_SCHEMA`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the dataset."""

    index: int
    """Position of the prompt in the dataset (stable across epochs and resumes)."""
    text: str
    """The prompt text, before tokenization."""


@dataclass(frozen=True)
class PromptShard:
    """A unit of generation work handed to one generator through the pool's work queue."""

    shard_id: int
    """Unique within a step; a shard whose actor dies is re-queued under the same id."""
    prompts: tuple[PromptItem, ...]
    """The prompts of this shard; each is sampled ``n`` times."""


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters shared by every generator in a step."""

    n: int = 1
    """Samples per prompt."""
    max_new_tokens: int = 32
    """Maximum response length in tokens."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """Base seed; a generator derives per-request seeds from it so that a step is reproducible."""


@dataclass
class Rollout:
    """One completion of one prompt, as sampled by a generator."""

    prompt_index: int
    """Index of the prompt in the dataset."""
    sample_index: int
    """Which of the ``n`` samples of that prompt (0-based)."""
    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    """Generated token ids, EOS included when the model stopped on it."""
    sampler_logprobs: list[float]
    """Log-probability of each response token under the sampler, one per ``response_ids``."""
    finish_reason: str
    """``"stop"`` (EOS) or ``"length"`` (hit ``max_new_tokens``)."""
    policy_version: int
    """Version of the weights the generator held when it sampled this rollout."""
    generator_id: str = ""
    """Which generator produced it (for diagnostics)."""
    reward: float | None = None
    """Total scalar reward, set by the reward actor."""
    reward_parts: dict[str, float] = field(default_factory=dict)
    """Unweighted score of each reward source, keyed by its name."""

    @property
    def key(self) -> tuple[int, int]:
        """(prompt_index, sample_index): unique within a step."""
        return (self.prompt_index, self.sample_index)


ROLLOUT_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("prompt_index", pa.int64()),
        ("sample_index", pa.int64()),
        ("policy_version", pa.int64()),
        ("generator_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("response_tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("reward", pa.float64()),
    ]
)
"""Fixed Arrow schema of the rollout log (one row per completion)."""


def rollouts_to_table(step: int, rollouts: list[Rollout]) -> pa.Table:
    """Rows of :data:`ROLLOUT_SCHEMA` for the given rollouts."""
    cols: dict[str, list] = {name: [] for name in ROLLOUT_SCHEMA.names}
    for r in rollouts:
        cols["step"].append(step)
        cols["prompt_index"].append(r.prompt_index)
        cols["sample_index"].append(r.sample_index)
        cols["policy_version"].append(r.policy_version)
        cols["generator_id"].append(r.generator_id)
        cols["prompt"].append(r.prompt)
        cols["response"].append(r.response)
        cols["response_tokens"].append(len(r.response_ids))
        cols["finish_reason"].append(r.finish_reason)
        cols["reward"].append(r.reward)
    return pa.table(cols, schema=ROLLOUT_SCHEMA)
