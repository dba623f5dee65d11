"""The reward actor's class: reward sources, summed with weights.

``RewardScorer`` is a plain class; the driver applies ``ray.remote`` at launch. A source is

* a Python reward function (``reward.functions``: ``module:function``, per sample or batched,
  plain or ``async``; it sees the prompt row's other dataset columns as keyword arguments --
  :mod:`ray_rlhf.rewards.functions`);
* a remote reward service (``reward.remote``: batches POSTed to a URL -- :mod:`ray_rlhf.rewards.remote`);
* a Hugging Face sequence-classification reward model (``reward.model_path`` --
  :mod:`ray_rlhf.rewards.model`).

For one completion, ``reward = sum_k w_k * source_k``; ``reward_parts`` keeps every unweighted
term, keyed by the function's spec, the URL, or ``"model"``. Everything the user gave is checked
in :func:`check_sources` before any weights are loaded (the driver's preflight runs it too).

A source that raises, or returns NaN, an infinity or a non-number, fails the whole
:meth:`RewardScorer.score` call with a :class:`RewardError` naming the source and the sample: the
learner never sees a partly scored batch.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ray_rlhf.errors import UserError
from ray_rlhf.records import RolloutBatch, RolloutSummary
from ray_rlhf.rewards.functions import RewardError, RewardFn, resolve_reward_fn
from ray_rlhf.rewards.model import MODEL_KEY, ModelReward, check_reward_model
from ray_rlhf.rewards.remote import RemoteReward

__all__ = ["MODEL_KEY", "RewardError", "RewardScorer", "check_reward_model", "check_sources", "resolve_function"]


def resolve_function(spec: str, kind: str = "sample", columns: Sequence[str] = ()) -> RewardFn:
    """Import and check one reward function (see :func:`~ray_rlhf.rewards.functions.resolve_reward_fn`)."""
    return resolve_reward_fn(spec, kind, columns)


def _function_specs(functions) -> list[tuple[str, float, str]]:
    """``(spec, weight[, kind])`` tuples as ``(spec, weight, kind)``."""
    return [(f[0], f[1], f[2] if len(f) > 2 else "sample") for f in functions]


def check_sources(functions, model_path: str | None = None, model_weight: float = 1.0,
                  remote: Sequence[dict] = (), columns: Sequence[str] = (),
                  env_rewards: bool = False) -> list[tuple[str, float, Any]]:
    """Every cheap check of the reward configuration; no weights are loaded, no request is sent.

    ``functions``: ``(spec, weight)`` or ``(spec, weight, kind)``; ``remote``: dicts with ``url``,
    ``weight``, ``timeout_s``, ``retries``; ``columns``: the dataset's extra columns (a function
    that needs a column no row has is refused here). Returns ``(name, weight, source)`` for the
    functions and remote services. Raises :class:`UserError` on the first problem. ``env_rewards``:
    an environment gives per-turn rewards (``env.name``), so no source at all is allowed (the final
    reward is then 0).
    """
    resolved: list[tuple[str, float, Any]] = []
    seen: set[str] = set()
    for spec, weight, kind in _function_specs(functions):
        if spec in seen:
            raise UserError(f"reward function {spec!r} is listed twice in reward.functions; list it once "
                            "with the summed weight")
        seen.add(spec)
        fn = resolve_function(spec, kind, columns)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"reward function {spec!r} has weight {weight!r}; give a finite number")
        resolved.append((spec, float(weight), fn))
    for r in remote:
        source = RemoteReward(r["url"], timeout=r.get("timeout_s", 30.0), retries=r.get("retries", 2))
        if r["url"] in seen:
            raise UserError(f"remote reward {r['url']} is listed twice in reward.remote; list it once")
        seen.add(r["url"])
        resolved.append((r["url"], float(r.get("weight", 1.0)), source))
    if model_path:
        check_reward_model(model_path)
        if not isinstance(model_weight, (int, float)) or not math.isfinite(model_weight):
            raise UserError(f"reward.model_weight is {model_weight!r}; give a finite number")
    if not resolved and not model_path and not env_rewards:
        raise UserError("no reward source: set reward.functions (e.g. ray_rlhf.rewards.rules:letter_frequency), "
                        "reward.remote and/or reward.model_path")
    return resolved


class RewardScorer:
    """Scores rollout batches with weighted reward sources.

    Args:
        functions: ``("module:function", weight)`` or ``("module:function", weight, kind)``.
        model_path: directory of a ``*ForSequenceClassification`` model with ``num_labels=1`` and
            its tokenizer, or None for no model.
        model_weight: weight of the model's score in the sum.
        batch_size: sequences per reward-model forward pass.
        device: torch device of the reward model.
        torch_threads: ``torch.set_num_threads`` for this process; ``"node"``: the cores of the
            node it runs on (``os.cpu_count()`` there); None: leave it.
        remote: remote services, dicts with ``url``, ``weight``, ``timeout_s``, ``retries``.
        columns: names of the dataset's extra columns (checked against the functions' signatures).
        env_rewards: the run's environment gives per-turn rewards (``env.name``): no source is needed.
    """

    def __init__(self, functions, model_path: str | None = None, model_weight: float = 1.0, batch_size: int = 32,
                 device: str = "cpu", torch_threads: int | str | None = None, remote: Sequence[dict] = (),
                 columns: Sequence[str] = (), env_rewards: bool = False):
        if batch_size <= 0:
            raise UserError(f"reward.batch_size is {batch_size}; give a positive integer")
        # Cheap checks first: no weights are loaded until every source is known to be usable.
        self.sources = check_sources(functions, model_path, model_weight, remote, columns, env_rewards)
        self.model_path = str(model_path) if model_path else None
        self.model_weight = float(model_weight)
        self._scored = 0
        self._seconds: dict[str, float] = {}
        if torch_threads and self.model_path:  # only a reward model computes with torch here
            import os

            import torch

            torch.set_num_threads((os.cpu_count() or 1) if torch_threads == "node" else int(torch_threads))
        self.model = ModelReward(self.model_path, batch_size, device) if self.model_path else None
        if self.model is not None:
            self.sources.append((MODEL_KEY, self.model_weight, self.model))

    # -- public API ---------------------------------------------------------------------------

    def score(self, *batches: RolloutBatch) -> tuple[RolloutBatch, RolloutSummary]:
        """The batches concatenated and scored (``reward`` and ``reward_parts`` filled), and the
        small summary the driver logs. Run it with Ray's ``num_returns=2`` and hand it the
        generators' ObjectRefs: the learner then takes the first result by reference.

        Raises :class:`RewardError` if any source fails on any sample; nothing is returned then.
        """
        batch = RolloutBatch.concat(batches)
        parts = self._score_texts(batch.prompt, batch.response, batch.columns, batch.keys())
        self._scored += len(batch)
        total = np.zeros(len(batch)) + sum(weight * parts[name] for name, weight, _ in self.sources)
        scored = batch.with_rewards(np.asarray(total, dtype=np.float64), parts)
        return scored, RolloutSummary.of(scored)

    def validate(self, prompt: str = "Tell me a story.", response: str = " Once there was a tree.",
                 columns: dict[str, Any] | None = None) -> dict[str, float]:
        """Score one synthetic sample through every source except remote services; returns its parts.

        Lets the driver surface a reward function that fails on ordinary text before the first
        rollout is generated. Raises :class:`RewardError` naming the source.
        """
        local = [s for s in self.sources if not isinstance(s[2], RemoteReward)]
        cols = {k: [v] for k, v in (columns or {}).items()}
        parts = self._score_texts([prompt], [response], cols, [(None, None)], sources=local,
                                  where=["the validation sample"])
        return {name: float(v[0]) for name, v in parts.items()}

    def ping(self) -> bool:
        """Liveness check for the driver."""
        return True

    def info(self) -> dict[str, Any]:
        """Sources, counts, time spent and memory, for benchmarks."""
        import psutil

        rss_mb = psutil.Process().memory_info().rss / 2**20
        return {
            "sources": [(name, w) for name, w, _ in self.sources],
            "model_params": self.model.num_parameters() if self.model is not None else 0,
            "scored": self._scored,
            "seconds": dict(self._seconds),
            "rss_mb": rss_mb,
            # Linux reports ru_maxrss in KiB; it trails the current RSS by a few pages at times.
            "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mb),
        }

    # -- internals ----------------------------------------------------------------------------

    def _score_texts(self, prompts: list[str], responses: list[str], columns: dict[str, list],
                     keys: list[tuple[int | None, int | None]], sources=None,
                     where: list[str] | None = None) -> dict[str, np.ndarray]:
        where = where or [f"prompt {p} sample {s}" for p, s in keys]
        parts: dict[str, np.ndarray] = {}
        for name, _, source in (self.sources if sources is None else sources):
            t0 = time.perf_counter()
            try:
                parts[name] = np.asarray(source(prompts, responses, columns, where), dtype=np.float64)
            except RewardError as err:
                if err.batch_index is not None:
                    err.prompt_index, err.sample_index = keys[err.batch_index]
                raise
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - t0
        return parts
