"""Interruptible single-turn generation (``rollout.partial=true``): new weights between engine steps.

:func:`generate_interruptible` adds every (prompt, sample) as its own request
(``llm.llm_engine.add_request``, ``n=1``, ``CUMULATIVE`` outputs, so the tokens and log-probs sampled
so far are known at any step) and calls ``engine.step()`` -- one scheduler iteration -- until all
are finished. Between two steps it asks the :class:`Mailbox` whether new weights were delivered.
If so:

1. every unfinished request is aborted; the tokens and log-probs it sampled in this segment are
   kept, each stamped with the version that sampled it (:meth:`Resumable.take`);
2. the mailbox loads the new weights into the engine (the generator's verified load path) and the
   prefix cache is reset, so no KV computed by the old weights is reused;
3. each unfinished request is added again with ``prompt + tokens so far`` as its prompt (prefilled
   under the new weights), ``max_tokens`` reduced by the tokens it has, and a seed derived from its
   own and the segment number (:func:`segment_seed`), so seeded runs stay seeded.

The result of a sequence is its segments concatenated: ``tokens``, ``logprobs`` (each under the
version that sampled it -- the behaviour log-probs the decoupled correction needs) and
``versions``; ``start_version`` is the version it began with (the oldest). Where the
interruptions fall depends on when the weights arrive, i.e. on timing.

Only the engine's ``add_request`` / ``step`` / ``abort_request`` / ``reset_prefix_cache`` are used
(a test drives a fake engine); vLLM is imported by the caller.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Mailbox", "Resumable", "generate_interruptible", "segment_seed"]

_SEED_RANGE = 2**31 - 1


def segment_seed(seed: int | None, segment: int) -> int | None:
    """The seed of a request's ``segment``-th segment: its own seed for the first (0), a hash of
    (seed, segment) after each interruption; None stays unseeded."""
    if seed is None or segment == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:segment:{segment}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_RANGE


class Mailbox(Protocol):
    """Where new weights wait for the generation loop (the generator's ``deliver`` fills it)."""

    def pending(self) -> bool:
        """Whether weights newer than the engine's are waiting (cheap; no load)."""

    def load_delivered(self) -> int:
        """Load the waiting weights into the engine (in the generation loop's thread); their version."""


@dataclass
class Resumable:
    """One (prompt, sample) request across its segments."""

    prompt_ids: list[int]
    max_tokens: int
    seed: int | None
    start_version: int
    """Version of the weights when the request was first added (the oldest of its tokens')."""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """Sampler log-prob of each token under the version that sampled it."""
    versions: list[int] = field(default_factory=list)
    """Version that sampled each token."""
    segments: int = 0
    """Interruptions so far (the current segment's number)."""
    finish_reason: str | None = None
    text: str | None = None
    """The engine's detokenized text when the request never was interrupted (None otherwise)."""

    @property
    def prompt(self) -> list[int]:
        """What the current segment is prefilled with: the prompt and every token sampled so far."""
        return self.prompt_ids + self.tokens

    @property
    def remaining(self) -> int:
        """Tokens the current segment may still sample."""
        return self.max_tokens - len(self.tokens)

    @property
    def seed_now(self) -> int | None:
        return segment_seed(self.seed, self.segments)

    def take(self, token_ids, logprobs, version: int) -> None:
        """Append one segment's (cumulative) output, sampled by ``version``."""
        token_ids, logprobs = list(token_ids), list(logprobs)
        if len(token_ids) != len(logprobs):
            raise RuntimeError(f"{len(logprobs)} log-probs for {len(token_ids)} tokens")
        self.tokens += token_ids
        self.logprobs += logprobs
        self.versions += [int(version)] * len(token_ids)


@dataclass
class PartialStats:
    interruptions: int = 0
    """Weight loads that interrupted in-flight requests."""
    loads: int = 0
    """Weight loads taken from the mailbox (before the first step too)."""
    steps: int = 0


def generate_interruptible(engine: Any, requests: list[Resumable], params_for: Callable[[Resumable], Any],
                           mailbox: Mailbox, version: Callable[[], int], make_prompt: Callable[[list[int]], Any],
                           name: str = "engine") -> PartialStats:
    """Run ``requests`` to completion on ``engine``, taking new weights from ``mailbox`` between steps.

    ``params_for(req)``: the request's ``SamplingParams`` for its current segment (``n=1``,
    ``req.remaining`` tokens, ``req.seed_now``, cumulative outputs, ``logprobs=0``);
    ``version()``: the version the engine holds now; ``make_prompt(ids)``: the engine's prompt
    object. Fills each request's tokens, log-probs, versions and finish reason in place.
    """
    stats = PartialStats()
    ids = itertools.count()
    live: dict[str, list] = {}  # request id -> [Resumable, latest cumulative completion or None]

    def add(req: Resumable) -> None:
        rid = f"{name}-partial-{next(ids)}"
        engine.add_request(rid, make_prompt(req.prompt), params_for(req))
        live[rid] = [req, None]

    if mailbox.pending():  # weights that arrived between shards: before any token
        mailbox.load_delivered()
        stats.loads += 1
        engine.reset_prefix_cache()
    for req in requests:
        req.start_version = version()
        add(req)
    while live:
        outs = engine.step()
        stats.steps += 1
        now = version()
        for out in outs:
            entry = live.get(out.request_id)
            if entry is None:
                continue
            entry[1] = c = out.outputs[0]
            if out.finished:
                req = entry[0]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"{name}: a request finished with {c.finish_reason!r}")
                req.take(c.token_ids, c.logprobs.logprobs if c.logprobs is not None else [], now)
                req.finish_reason = c.finish_reason
                req.text = c.text if req.segments == 0 else None
                del live[out.request_id]
        if live and mailbox.pending():
            engine.abort_request(list(live))
            for req, c in live.values():
                if c is not None:  # tokens sampled in this segment, by the old weights
                    req.take(c.token_ids, c.logprobs.logprobs if c.logprobs is not None else [], now)
                req.segments += 1
            mailbox.load_delivered()
            engine.reset_prefix_cache()
            stats.loads += 1
            stats.interruptions += 1
            unfinished = [req for req, _ in live.values()]
            live.clear()
            for req in unfinished:
                if req.remaining <= 0:  # cannot happen (it would have finished with "length"); guard anyway
                    req.finish_reason = "length"
                    continue
                add(req)
    return stats
