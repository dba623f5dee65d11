"""What one learner step reports: typed records whose fields name their own metric keys.

A field made with :func:`stat` carries its metric key (``ppo/policy_loss``, ``adv/zero_std_groups``:
each defined once in docs/metrics.md) and how micro-batches and learner ranks combine it (``sum``:
each pass reports its token-weighted share; ``max``). The driver logs :meth:`Stats.metrics` as it
is: the dataclass fields are the one list of a step's learner metrics.

:class:`LearnerStats` holds what every objective's step reports (the engine's :class:`UpdateStats`,
the version, timings, staleness); an objective's step record extends it with its own fields
(:class:`~ray_rlhf.learning.objectives.ppo.PPOStats`).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, TypeVar

S = TypeVar("S", bound="Stats")


def stat(key: str, default: Any = MISSING, *, reduce: str = "sum") -> Any:
    """A stats field logged as metric ``key``; ``reduce`` (``sum`` or ``max``) combines the values of
    the micro-batches of a minibatch and of the learner ranks."""
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max'; got {reduce!r}")
    return field(default=default, metadata={"metric": key, "reduce": reduce})


@dataclass(kw_only=True)
class Stats:
    """A record of :func:`stat` fields."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def metrics(self) -> dict[str, Any]:
        """Metric key -> value (the keys of docs/metrics.md)."""
        return {f.metadata["metric"]: getattr(self, f.name) for f in fields(self)}

    def __getitem__(self, name: str) -> Any:
        """``stats["kl_ref"]``: a field by name."""
        if name not in {f.name for f in fields(self)}:
            raise KeyError(name)
        return getattr(self, name)


def merged(a: S, b: S) -> S:
    """Two passes' records combined field by field (sum, or max where the field says so)."""
    return replace(a, **{f.name: max(getattr(a, f.name), getattr(b, f.name)) if f.metadata["reduce"] == "max"
                         else getattr(a, f.name) + getattr(b, f.name) for f in fields(a)})


def summed(a: S, b: S) -> S:
    """Every field added (minibatches' records, to be averaged with :func:`divided`)."""
    return replace(a, **{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(a)})


def divided(a: S, n: int) -> S:
    return replace(a, **{f.name: getattr(a, f.name) / n for f in fields(a)})


def reduce_kinds(record: Stats) -> list[str]:
    """Each field's ``reduce`` (``sum`` / ``max``), in field order."""
    return [f.metadata["reduce"] for f in fields(record)]


def with_values(record: S, values: list[float]) -> S:
    """``record`` with its fields (in order) replaced by ``values``."""
    return replace(record, **{f.name: v for f, v in zip(fields(record), values)})


def combine(cls: type[S], *parts: Stats | None, **values: Any) -> S:
    """One ``cls`` record from the fields of ``parts`` (None: left out) and ``values``; a field no
    part gives keeps its default (e.g. the loss record's when no update ran)."""
    out: dict[str, Any] = {}
    for part in [p for p in parts if p is not None] + [values]:
        given = part if isinstance(part, dict) else part.to_dict()
        twice = set(out) & set(given)
        if twice:
            raise ValueError(f"stats {sorted(twice)} given twice")
        out.update(given)
    return cls(**out)


@dataclass(kw_only=True)
class UpdateStats(Stats):
    """The engine's own numbers of an update (the loss's are the objective's record)."""

    grad_norm: float = stat("ppo/grad_norm", math.nan)
    """Gradient norm before clipping, averaged over optimizer steps."""
    optimizer_steps: int = stat("ppo/optimizer_steps", 0)
    padded_tokens: int = stat("perf/padded_tokens", 0)
    real_tokens: int = stat("perf/real_tokens", 0)


@dataclass(kw_only=True)
class LearnerStats(UpdateStats):
    """What every learner step reports, over the whole batch (the same at any number of ranks)."""

    version: int = stat("ppo/version")
    """Policy version after this update."""
    lr: float = stat("ppo/lr")
    response_tokens: int = stat("ppo/response_tokens")
    prepare_seconds: float = stat("ppo/prepare_seconds")
    update_seconds: float = stat("ppo/update_seconds")
    staleness_mean: float = stat("rollout/staleness_mean", 0.0)
    staleness_max: int = stat("rollout/staleness_max", 0)
