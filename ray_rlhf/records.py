"""Typed records passed between actors.

A prompt travels as a :class:`PromptItem` (already tokenized, with its dataset row's other
columns), grouped into :class:`PromptShard` s of generation work. Every generator returns its
completions as one columnar :class:`RolloutBatch`: flat NumPy arrays with offsets (like Arrow's
list arrays), concatenated across shards without per-token Python work, scored in place by the
reward actor, padded by the learner with vectorised code and written to Parquet as it is
(:meth:`RolloutBatch.to_arrow`).

Nothing here imports Ray, vLLM or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

_SEED_STRIDE = 1_000_003
"""Per-step sampling seed = ``seed * _SEED_STRIDE + step`` (distinct for every (seed, step))."""

FINISH_REASONS = ("stop", "length", "max_turns", "max_total_tokens", "env_error")
"""How a completion may end: ``"stop"`` -- the model sampled EOS (kept as its last token), or, in a
multi-turn run, the environment said done; ``"length"`` -- it was cut off without one, at
``max_new_tokens`` (or, rarely, at the engine's context limit). Multi-turn runs only
(:mod:`ray_rlhf.generation.trajectory`): ``"max_turns"`` -- ``env.max_turns`` model turns without
the environment saying done; ``"max_total_tokens"`` -- the trajectory reached
``rollout.max_total_tokens``; ``"env_error"`` -- the environment raised or passed
``env.step_timeout_s``. Every reason but ``"stop"`` is :attr:`RolloutBatch.truncated`."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the dataset, tokenized once when the dataset is loaded."""

    index: int
    """Position of the prompt in the dataset (stable across epochs and resumes)."""
    text: str
    """The prompt as the model reads it (chat template applied), as reward functions see it."""
    prompt_ids: tuple[int, ...] = ()
    """Token ids fed to the engine (special tokens and chat template included)."""
    columns: Mapping[str, Any] = field(default_factory=dict)
    """The dataset row's other columns (e.g. ``answer``, ``data_source``), passed through to the
    reward functions and the rollout log."""


@dataclass(frozen=True)
class PromptShard:
    """A unit of generation work handed to one generator through the pool's work queue."""

    shard_id: int
    """Unique within a step; a shard whose actor dies is re-queued under the same id."""
    prompts: tuple[PromptItem, ...]
    """The prompts of this shard; each is sampled ``n`` times, so a prompt's group of samples
    is always produced (and re-queued) whole."""


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
    ignore_eos: bool = False
    """Sample past EOS: every response is ``max_new_tokens`` long (``rollout.ignore_eos``)."""

    @classmethod
    def for_step(cls, rollout_cfg: Any, seed: int, step: int) -> SamplingSpec:
        """The sampling of PPO step ``step`` (1-based) of a run: the one definition of it.

        ``rollout_cfg`` is the run's :class:`~ray_rlhf.config.schema.RolloutConfig`. The seed
        depends only on (run seed, step), so a resumed or recovered run samples exactly what an
        undisturbed run samples.
        """
        return cls(n=rollout_cfg.samples_per_prompt, max_new_tokens=rollout_cfg.max_new_tokens,
                   temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                   seed=seed * _SEED_STRIDE + step, ignore_eos=rollout_cfg.ignore_eos)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def ragged_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat gather indices of the given ``rows`` of a ragged array, and the new offsets.

    Shape: offsets (N+1,), rows (M,) -> (indices (sum of the rows' lengths,), new offsets (M+1,)).
    Vectorised: no Python loop over rows.
    """
    starts, lengths = offsets[:-1][rows], np.diff(offsets)[rows]
    new = _offsets(lengths)
    within = np.arange(new[-1], dtype=np.int64) - np.repeat(new[:-1], lengths)
    return np.repeat(starts, lengths) + within, new


def pad_ragged(values: np.ndarray, offsets: np.ndarray, pad: float | int, left: bool = False,
               width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A ragged array as a dense (N, W) matrix plus a 0/1 mask, with one scatter (no row loop).

    Row ``i`` holds ``values[offsets[i]:offsets[i+1]]``, at the start (right padding) or the end
    (``left=True``) of the row; the rest is ``pad``. ``W = width`` or the longest row (at least 1).

    Shape: values (L,), offsets (N+1,) -> (dense (N, W), mask (N, W) int8, 1 = value).
    """
    lengths = np.diff(offsets)
    n = len(lengths)
    w = max(int(lengths.max(initial=0)), 1) if width is None else int(width)
    dense = np.full((n, w), pad, dtype=values.dtype)
    mask = np.zeros((n, w), dtype=np.int8)
    row = np.repeat(np.arange(n), lengths)
    col = np.arange(len(values), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    if left:
        col = col + np.repeat(w - lengths, lengths)
    dense[row, col] = values
    mask[row, col] = 1
    return dense, mask


@dataclass
class RolloutBatch:
    """Completions as columns: one entry per sequence, token columns flat with offsets.

    Sequence ``i`` has prompt tokens ``prompt_ids[prompt_offsets[i]:prompt_offsets[i+1]]`` and
    response tokens (EOS included when sampled) ``response_ids[response_offsets[i]:...]``;
    ``sampler_logprobs`` is aligned with ``response_ids``. Rows are ordered by
    (``prompt_index``, ``sample_index``) within a shard; :meth:`concat` keeps shard order.
    """

    prompt_index: np.ndarray
    """Dataset index of each sequence's prompt. Shape (N,), int64."""
    sample_index: np.ndarray
    """Which of the ``n`` samples of that prompt (0-based). Shape (N,), int64."""
    policy_version: np.ndarray
    """Weight version the generator held when it sampled the sequence. Shape (N,), int64."""
    finish_reason: np.ndarray
    """``"stop"`` (EOS) or ``"length"`` (cut off at ``max_new_tokens`` without EOS), or a multi-turn
    limit or error: one of
    :data:`FINISH_REASONS`; :attr:`truncated` is its boolean view. Shape (N,), str."""
    generator_id: np.ndarray
    """Which generator produced it (diagnostics). Shape (N,), str."""
    prompt_ids: np.ndarray
    """Prompt tokens, flat. Shape (sum of prompt lengths,), int32."""
    prompt_offsets: np.ndarray
    """Shape (N+1,), int64."""
    response_ids: np.ndarray
    """Response tokens, flat. Shape (sum of response lengths,), int32."""
    response_offsets: np.ndarray
    """Shape (N+1,), int64."""
    sampler_logprobs: np.ndarray
    """The sampler's log-probability of each response token, flat, aligned with
    ``response_ids``. Shape (sum of response lengths,), float32."""
    prompt: list[str]
    """Prompt text of each sequence (as the model read it)."""
    response: list[str]
    """Decoded response of each sequence."""
    reward: np.ndarray
    """Total scalar reward, NaN until the reward actor scores the batch. Shape (N,), float64."""
    reward_parts: dict[str, np.ndarray] = field(default_factory=dict)
    """Unweighted score of each reward source, keyed by its name. Each shape (N,), float64."""
    columns: dict[str, list] = field(default_factory=dict)
    """The prompt rows' other dataset columns, one value per sequence."""
    loss_mask: np.ndarray | None = None
    """Multi-turn trajectories: 1 where the response token was sampled by the model, 0 where it
    was appended between turns (an environment's observation, chat-template tokens), flat and
    aligned with ``response_ids``. ``None``: every response token is the model's (single turn).
    The model's turns are the maximal runs of 1 (:attr:`turn_count`). Shape (sum of response
    lengths,), int8."""
    token_reward: np.ndarray | None = None
    """Per-turn rewards from an environment, on the last model token of each turn, 0 elsewhere;
    flat and aligned with ``response_ids``. ``None``: no per-turn rewards. The sequence's
    :attr:`reward` is the final reward, on its last model token. Shape (sum of response lengths,),
    float32."""
    token_versions: np.ndarray | None = None
    """``rollout.partial=true``: the policy version that sampled each response token, flat and
    aligned with ``response_ids`` (a sequence interrupted by a weight load carries its old version
    before the switch and the new one after; :attr:`policy_version` is the version it started
    with, the oldest). ``None``: every token has its sequence's :attr:`policy_version`
    (:attr:`versions_per_token`). Shape (sum of response lengths,), int64."""

    def __post_init__(self) -> None:
        for name in ("loss_mask", "token_reward", "token_versions"):
            v = getattr(self, name)
            if v is not None and len(v) != len(self.response_ids):
                raise ValueError(f"{name} has {len(v)} entries, the batch {len(self.response_ids)} response tokens")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_sequences(cls, *, prompt_index: Sequence[int], sample_index: Sequence[int],
                       prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                       sampler_logprobs: Sequence[Sequence[float]], prompt: Sequence[str],
                       response: Sequence[str], finish_reason: Sequence[str], policy_version: int | Sequence[int],
                       generator_id: str | Sequence[str] = "", columns: Mapping[str, list] | None = None,
                       reward: Sequence[float] | None = None,
                       loss_mask: Sequence[Sequence[int]] | None = None,
                       token_reward: Sequence[Sequence[float]] | None = None,
                       token_versions: Sequence[Sequence[int]] | None = None) -> RolloutBatch:
        """A batch from per-sequence Python lists (tests, the transformers sampler)."""
        n, finish_reason = len(prompt_index), [str(r) for r in finish_reason]
        if bad := sorted(set(finish_reason) - set(FINISH_REASONS)):
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {bad}")
        plen = np.array([len(x) for x in prompt_ids], dtype=np.int64)
        rlen = np.array([len(x) for x in response_ids], dtype=np.int64)
        flat = lambda rows, dt: np.fromiter((v for r in rows for v in r), dtype=dt, count=-1)  # noqa: E731
        versions = np.full(n, policy_version, np.int64) if np.isscalar(policy_version) else np.asarray(policy_version)
        gids = [generator_id] * n if isinstance(generator_id, str) else list(generator_id)
        return cls(
            prompt_index=np.asarray(prompt_index, dtype=np.int64).reshape(n),
            sample_index=np.asarray(sample_index, dtype=np.int64).reshape(n),
            policy_version=versions.astype(np.int64).reshape(n),
            finish_reason=np.asarray(finish_reason, dtype=str).reshape(n),
            generator_id=np.asarray(gids, dtype=str).reshape(n),
            prompt_ids=flat(prompt_ids, np.int32), prompt_offsets=_offsets(plen),
            response_ids=flat(response_ids, np.int32), response_offsets=_offsets(rlen),
            sampler_logprobs=flat(sampler_logprobs, np.float32),
            prompt=list(prompt), response=list(response),
            reward=np.full(n, np.nan) if reward is None else np.asarray(reward, dtype=np.float64),
            columns={k: list(v) for k, v in (columns or {}).items()},
            loss_mask=None if loss_mask is None else flat(loss_mask, np.int8),
            token_reward=None if token_reward is None else flat(token_reward, np.float32),
            token_versions=None if token_versions is None else flat(token_versions, np.int64),
        )

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """The batches one after the other (offsets shifted; no per-token Python work)."""
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        if len(batches) == 1:
            return batches[0]

        def cat_offsets(name: str) -> np.ndarray:
            parts, base = [np.zeros(1, np.int64)], 0
            for b in batches:
                off = getattr(b, name)
                parts.append(off[1:] + base)
                base += int(off[-1])
            return np.concatenate(parts)

        parts_keys = set(batches[0].reward_parts)
        col_keys = set(batches[0].columns)
        if any(set(b.reward_parts) != parts_keys or set(b.columns) != col_keys for b in batches):
            raise ValueError("RolloutBatch.concat: batches carry different reward parts or columns")
        cat = lambda name: np.concatenate([getattr(b, name) for b in batches])  # noqa: E731
        return cls(
            prompt_index=cat("prompt_index"), sample_index=cat("sample_index"),
            policy_version=cat("policy_version"), finish_reason=cat("finish_reason"),
            generator_id=cat("generator_id"), prompt_ids=cat("prompt_ids"),
            prompt_offsets=cat_offsets("prompt_offsets"), response_ids=cat("response_ids"),
            response_offsets=cat_offsets("response_offsets"), sampler_logprobs=cat("sampler_logprobs"),
            prompt=[p for b in batches for p in b.prompt], response=[r for b in batches for r in b.response],
            reward=cat("reward"),
            reward_parts={k: np.concatenate([b.reward_parts[k] for b in batches]) for k in sorted(parts_keys)},
            columns={k: [v for b in batches for v in b.columns[k]] for k in sorted(col_keys)},
            loss_mask=(None if all(b.loss_mask is None for b in batches)
                       else np.concatenate([b.model_mask for b in batches])),
            token_reward=(None if all(b.token_reward is None for b in batches)
                          else np.concatenate([b.token_rewards for b in batches])),
            token_versions=(None if all(b.token_versions is None for b in batches)
                            else np.concatenate([b.versions_per_token for b in batches])),
        )

    # ---- views --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.prompt_index)

    @property
    def prompt_lengths(self) -> np.ndarray:
        """Shape (N,), int64."""
        return np.diff(self.prompt_offsets)

    @property
    def response_lengths(self) -> np.ndarray:
        """Shape (N,), int64."""
        return np.diff(self.response_offsets)

    @property
    def model_mask(self) -> np.ndarray:
        """:attr:`loss_mask`, or all ones for single-turn rows. Shape (sum of response lengths,), int8."""
        return np.ones(len(self.response_ids), np.int8) if self.loss_mask is None else self.loss_mask

    @property
    def token_rewards(self) -> np.ndarray:
        """:attr:`token_reward`, or all zeros. Shape (sum of response lengths,), float32."""
        return np.zeros(len(self.response_ids), np.float32) if self.token_reward is None else self.token_reward

    @property
    def versions_per_token(self) -> np.ndarray:
        """:attr:`token_versions`, or each sequence's :attr:`policy_version` repeated over its
        response tokens. Shape (sum of response lengths,), int64."""
        if self.token_versions is not None:
            return self.token_versions
        return np.repeat(self.policy_version.astype(np.int64), self.response_lengths)

    @property
    def interrupted(self) -> np.ndarray:
        """Whether a weight load interrupted each sequence (``rollout.partial``: one of its tokens
        was sampled by a version other than the one it started with). Shape (N,), bool."""
        if self.token_versions is None:
            return np.zeros(len(self), dtype=bool)
        row = np.repeat(np.arange(len(self)), self.response_lengths)
        changed = self.token_versions != self.policy_version[row]
        return np.bincount(row, weights=changed, minlength=len(self)) > 0

    @property
    def turn_count(self) -> np.ndarray:
        """Model turns of each sequence: runs of 1 in :attr:`model_mask` (1 for a single-turn
        row with a response, 0 for an empty one). Shape (N,), int64."""
        m = self.model_mask.astype(np.int64)
        prev = np.concatenate([[0], m[:-1]])
        prev[self.response_offsets[:-1][self.response_lengths > 0]] = 0  # no run crosses a row boundary
        row = np.repeat(np.arange(len(self)), self.response_lengths)
        return np.bincount(row, weights=(m == 1) & (prev == 0), minlength=len(self)).astype(np.int64)

    @property
    def truncated(self) -> np.ndarray:
        """Whether each sequence was cut off (``finish_reason != "stop"``: a length limit, a turn
        limit or an environment error): its last token is not a natural end. Derived from :attr:`finish_reason`, so every constructor,
        :meth:`concat`, :meth:`select`, :meth:`with_rewards` and the rollout log carry it.
        Shape (N,), bool."""
        return self.finish_reason != "stop"

    @property
    def scored(self) -> bool:
        """Whether every sequence has a (finite) reward."""
        return bool(len(self)) and bool(np.isfinite(self.reward).all())

    def keys(self) -> list[tuple[int, int]]:
        """(prompt_index, sample_index) of every sequence: unique within a step."""
        return list(zip(self.prompt_index.tolist(), self.sample_index.tolist()))

    def select(self, rows: np.ndarray | Sequence[int]) -> RolloutBatch:
        """The given rows, in the given order (vectorised gather of the token columns)."""
        rows = np.asarray(rows, dtype=np.int64)
        p_idx, p_off = ragged_rows(self.prompt_offsets, rows)
        r_idx, r_off = ragged_rows(self.response_offsets, rows)
        pick = rows.tolist()
        return dataclasses.replace(
            self, prompt_index=self.prompt_index[rows], sample_index=self.sample_index[rows],
            policy_version=self.policy_version[rows], finish_reason=self.finish_reason[rows],
            generator_id=self.generator_id[rows], prompt_ids=self.prompt_ids[p_idx], prompt_offsets=p_off,
            response_ids=self.response_ids[r_idx], response_offsets=r_off,
            sampler_logprobs=self.sampler_logprobs[r_idx],
            prompt=[self.prompt[i] for i in pick], response=[self.response[i] for i in pick],
            reward=self.reward[rows], reward_parts={k: v[rows] for k, v in self.reward_parts.items()},
            columns={k: [v[i] for i in pick] for k, v in self.columns.items()},
            loss_mask=None if self.loss_mask is None else self.loss_mask[r_idx],
            token_reward=None if self.token_reward is None else self.token_reward[r_idx],
            token_versions=None if self.token_versions is None else self.token_versions[r_idx],
        )

    def with_rewards(self, reward: np.ndarray, parts: Mapping[str, np.ndarray]) -> RolloutBatch:
        """This batch scored: ``reward`` (N,) and each source's unweighted ``parts`` (N,)."""
        reward = np.asarray(reward, dtype=np.float64)
        if reward.shape != (len(self),):
            raise ValueError(f"reward has shape {reward.shape}, the batch {len(self)} sequences")
        return dataclasses.replace(self, reward=reward,
                                   reward_parts={k: np.asarray(v, dtype=np.float64) for k, v in parts.items()})

    # ---- the rollout log ------------------------------------------------------------------
    def to_arrow(self, step: int) -> pa.Table:
        """The batch as rows of the rollout log (:data:`ROLLOUT_SCHEMA` columns first, then one
        ``reward_part/<source>`` column per source and the dataset's columns). Token columns
        become Arrow list arrays over the same flat buffers."""
        n = len(self)

        def lists(values: np.ndarray, offsets: np.ndarray, typ: pa.DataType) -> pa.Array:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=typ))

        cols: dict[str, Any] = {
            "step": pa.array(np.full(n, step, np.int64)),
            "prompt_index": pa.array(self.prompt_index), "sample_index": pa.array(self.sample_index),
            "policy_version": pa.array(self.policy_version),
            "generator_id": pa.array(self.generator_id.tolist(), pa.string()),
            "prompt": pa.array(self.prompt, pa.string()), "response": pa.array(self.response, pa.string()),
            "response_tokens": pa.array(self.response_lengths),
            "finish_reason": pa.array(self.finish_reason.tolist(), pa.string()),
            "reward": pa.array(self.reward, pa.float64()),
            "prompt_ids": lists(self.prompt_ids, self.prompt_offsets, pa.int32()),
            "response_ids": lists(self.response_ids, self.response_offsets, pa.int32()),
            "sampler_logprobs": lists(self.sampler_logprobs, self.response_offsets, pa.float32()),
        }
        if self.loss_mask is not None:
            cols["loss_mask"] = lists(self.loss_mask, self.response_offsets, pa.int8())
        if self.token_reward is not None:
            cols["token_reward"] = lists(self.token_reward, self.response_offsets, pa.float32())
        if self.token_versions is not None:
            cols["token_versions"] = lists(self.token_versions, self.response_offsets, pa.int64())
        for name, values in self.reward_parts.items():
            cols[f"reward_part/{name}"] = pa.array(values, pa.float64())
        for name, values in self.columns.items():
            if name not in cols:
                cols[name] = pa.array(values)
        return pa.table(cols)


def rollout_batch_from_arrow(table: pa.Table) -> RolloutBatch:
    """The :class:`RolloutBatch` of a table written by :meth:`RolloutBatch.to_arrow` (exact:
    tokens, log-probs, rewards, reward parts and dataset columns)."""
    def flat(name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
        col = table.column(name).combine_chunks()
        offsets = np.asarray(col.offsets, dtype=np.int64)
        values = np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=dtype)
        return values[offsets[0]: offsets[-1]], offsets - offsets[0]

    p_ids, p_off = flat("prompt_ids", np.int32)
    r_ids, r_off = flat("response_ids", np.int32)
    lps, _ = flat("sampler_logprobs", np.float32)
    fixed = set(ROLLOUT_SCHEMA.names) | set(MULTI_TURN_COLUMNS)
    loss_mask = flat("loss_mask", np.int8)[0] if "loss_mask" in table.column_names else None
    token_reward = flat("token_reward", np.float32)[0] if "token_reward" in table.column_names else None
    token_versions = flat("token_versions", np.int64)[0] if "token_versions" in table.column_names else None
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    return RolloutBatch(
        prompt_index=col("prompt_index").astype(np.int64), sample_index=col("sample_index").astype(np.int64),
        policy_version=col("policy_version").astype(np.int64),
        finish_reason=np.asarray(table.column("finish_reason").to_pylist(), dtype=str),
        generator_id=np.asarray(table.column("generator_id").to_pylist(), dtype=str),
        prompt_ids=p_ids, prompt_offsets=p_off, response_ids=r_ids, response_offsets=r_off, sampler_logprobs=lps,
        prompt=table.column("prompt").to_pylist(), response=table.column("response").to_pylist(),
        reward=np.asarray(table.column("reward").to_pylist(), dtype=np.float64),
        reward_parts={n.removeprefix("reward_part/"): col(n).astype(np.float64) for n in table.column_names
                      if n.startswith("reward_part/")},
        columns={n: table.column(n).to_pylist() for n in table.column_names
                 if n not in fixed and not n.startswith("reward_part/")},
        loss_mask=loss_mask, token_reward=token_reward, token_versions=token_versions,
    )


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
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("sampler_logprobs", pa.list_(pa.float32())),
    ]
)
"""The fixed columns of the rollout log (one row per completion); after them come the
:data:`MULTI_TURN_COLUMNS` of multi-turn runs, one ``reward_part/<source>`` column per reward
source and the dataset's own columns."""

MULTI_TURN_COLUMNS = ("loss_mask", "token_reward", "token_versions")
"""Rollout-log columns written only when the batch carries them (lists aligned with ``response_ids``;
``token_versions``: ``rollout.partial`` runs)."""


@dataclass(frozen=True)
class RolloutSummary:
    """The small statistics of one step's scored batch that the driver logs (no token arrays)."""

    count: int
    reward_mean: float
    reward_std: float
    """Population standard deviation (ddof=0)."""
    reward_min: float
    reward_max: float
    reward_parts: dict[str, float]
    """Mean unweighted score per source."""
    length_mean: float
    length_max: int
    finished_frac: float
    """Fraction of sequences that ended on EOS (``finish_reason == "stop"``)."""
    truncated_frac: float
    """Fraction of sequences cut off at the length limit (:attr:`RolloutBatch.truncated`)."""
    response_tokens: int
    version_min: int
    version_mean: float
    versions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """The policy version of every sequence. Shape (N,), int64."""
    token_version_min: int | None = None
    """``rollout.partial``: the oldest version that sampled a response token (None: no per-token versions)."""
    token_version_mean: float | None = None
    """``rollout.partial``: the mean version over response tokens."""
    partial_frac: float | None = None
    """``rollout.partial``: fraction of sequences interrupted by a weight load (:attr:`RolloutBatch.interrupted`)."""

    @classmethod
    def of(cls, batch: RolloutBatch) -> RolloutSummary:
        if not len(batch):
            raise ValueError("RolloutSummary needs at least one sequence")
        if not batch.scored:
            raise ValueError("RolloutSummary needs a scored batch (a reward is NaN)")
        lengths = batch.response_lengths
        return cls(
            count=len(batch), reward_mean=float(batch.reward.mean()), reward_std=float(batch.reward.std()),
            reward_min=float(batch.reward.min()), reward_max=float(batch.reward.max()),
            reward_parts={k: float(v.mean()) for k, v in sorted(batch.reward_parts.items())},
            length_mean=float(lengths.mean()), length_max=int(lengths.max()),
            finished_frac=float((batch.finish_reason == "stop").mean()),
            truncated_frac=float(batch.truncated.mean()), response_tokens=int(lengths.sum()),
            version_min=int(batch.policy_version.min()), version_mean=float(batch.policy_version.mean()),
            versions=batch.policy_version.astype(np.int64),
            **_token_version_stats(batch),
        )


def _token_version_stats(batch: RolloutBatch) -> dict:
    """:class:`RolloutSummary`'s per-token version fields (empty without ``token_versions``)."""
    tv = batch.token_versions
    if tv is None:
        return {}
    return dict(token_version_min=int(tv.min()) if len(tv) else int(batch.policy_version.min()),
                token_version_mean=float(tv.mean()) if len(tv) else float(batch.policy_version.mean()),
                partial_frac=float(batch.interrupted.mean()))
