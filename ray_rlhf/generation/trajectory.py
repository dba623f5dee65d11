"""Multi-turn rollouts: the model and an environment take turns, token in and token out.

Two schedules (``env.scheduling``). ``turns`` (:func:`run_trajectories`): every live trajectory of
a shard samples its next turn in one engine call (one request per trajectory), then every
environment steps (concurrently, each under ``env.step_timeout_s``), then the next turn; the engine
idles while the environments step. ``continuous``
(:func:`ray_rlhf.generation.continuous.run_trajectories_continuous`): each trajectory is a coroutine
whose turn goes to the engine as soon as its observation is ready, while the engine keeps decoding
the others. Both share the per-turn bookkeeping below (:func:`take_turn`, :func:`after_step`).

Token in, token out: a trajectory's ids are the prompt ids, then exactly the ids the engine sampled
for turn 1, then the observation's ids, then the ids sampled for turn 2, ... The sampled text is
never tokenized again. An observation's ids are the chat template's *delta*
(:class:`TemplateDelta`): the text the template renders after the previous message's content, up
to and including the next generation prompt, tokenized on its own -- so the prompt is rendered once
and each observation incrementally (``tests/unit/test_trajectory.py`` checks that the pieces add
up to the whole conversation rendered at once).

Per trajectory the row holds ``loss_mask`` (1 on sampled ids, 0 on observation ids), behaviour
log-probs (the sampler's for sampled ids, 0.0 on observation ids) and ``token_reward`` (each turn's
environment reward on the turn's last sampled id). Finish reasons: ``stop`` (the environment said
done), ``length`` (done, but the last turn was cut at ``rollout.max_new_tokens``), ``max_turns``,
``max_total_tokens``, ``env_error`` (reset or step raised, returned nothing in time).

Nothing here imports vLLM: the engine is a :data:`Sampler` callable (the generator's wraps vLLM;
the unit tests use a fake one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ray_rlhf.envs.base import as_messages, check_step
from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem, RolloutBatch

__all__ = ["EnvStats", "Sampled", "TemplateDelta", "TrajectoryLimits", "TurnRequest", "after_step", "apply_reset",
           "call_env", "make_trajectories", "next_request", "reset_call", "run_trajectories", "take_turn", "to_batch"]

log = logging.getLogger(__name__)

_MARK = "RAYRLHFMARK"
"""Stands for the previous message's content when rendering a delta (found with ``rfind``)."""

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""Used for tokenizers without a chat template: plain ``role: content`` lines."""


class TurnRequest(NamedTuple):
    """One turn to sample: the whole trajectory so far as ids, at most ``max_tokens`` new ones."""

    prompt_ids: list[int]
    max_tokens: int
    seed: int | None
    stop: tuple[str, ...] = ()
    """Stop strings (an OpenAI-client agent's ``stop``); none for environments."""


class Sampled(NamedTuple):
    """What the engine sampled for one :class:`TurnRequest`."""

    token_ids: list[int]
    logprobs: list[float]
    """The sampler's log-prob of each sampled id."""
    finish_reason: str
    """``stop`` (EOS or a stop token) or ``length`` (``max_tokens`` used up)."""
    text: str


Sampler = Callable[[list[TurnRequest]], list[Sampled]]
"""Samples one turn for each request, in order (the generator's wraps one ``vllm.LLM.generate``)."""


@dataclass(frozen=True)
class TrajectoryLimits:
    """The limits of one trajectory (``rollout.max_new_tokens`` per turn, ``env.max_turns``,
    ``rollout.max_total_tokens`` for prompt plus every turn, ``env.step_timeout_s`` per env call)."""

    max_new_tokens: int
    max_turns: int
    max_total_tokens: int
    step_timeout_s: float


@dataclass
class EnvStats:
    """Counts of one shard's trajectories, summed over shards into the ``env/*`` metrics."""

    trajectories: int = 0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    errors: int = 0
    """Trajectories ended by finish reason ``env_error``."""
    seconds: float = 0.0
    """Wall time inside ``reset`` and ``step`` calls (concurrent calls counted once per round)."""
    observation_tokens: int = 0
    reward_sum: float = 0.0
    """Sum of every trajectory's environment rewards."""
    engine_seconds: float = 0.0
    """Wall time the engine had requests to sample (inside its calls or steps)."""
    wall_seconds: float = 0.0
    """Wall time of the shard's rollouts, from the first ``reset`` to the last trajectory's end."""

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class TemplateDelta:
    """The chat template's tokens between turns, rendered incrementally.

    ``delta(after, messages)``: the text the template puts after the content of a message of role
    ``after`` (``user`` for the prompt, ``assistant`` for a model turn) when ``messages`` follow,
    up to the generation prompt: the previous turn's closing text (e.g. Qwen's ``<|im_end|>\\n``),
    the new messages, and the opening of the next assistant turn. When the model's turn ended on a
    token whose text the delta starts with (its EOS: Qwen's ``<|im_end|>``), that text is not
    repeated. ``tools``: JSON schemas passed to the template (``tools=``).
    """

    def __init__(self, tokenizer, tools: Sequence[dict] | None = None):
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        self.template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        self.eos_text = getattr(tokenizer, "eos_token", None) or ""

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        if self.template is not None:
            kwargs["chat_template"] = self.template
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def delta_text(self, after: str, messages: list[dict], ended_on_eos: bool = False) -> str:
        base = ([{"role": "user", "content": _MARK}] if after == "user"
                else [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}])
        text = self.render(base + list(messages), add_generation_prompt=True)
        at = text.rfind(_MARK)
        if at < 0:
            raise UserError("the chat template dropped a message's content; multi-turn rollouts need a template "
                            "that renders every message")
        text = text[at + len(_MARK):]
        if ended_on_eos and self.eos_text and text.startswith(self.eos_text):
            text = text[len(self.eos_text):]
        return text

    def after_prompt(self, prompt_ids: list[int], prompt_text: str, messages: list[dict]) -> tuple[list[int], str]:
        """The prompt with ``messages`` (the environment's first observation) after it.

        A templated prompt ends with its user message's closing text and the generation prompt
        (the delta after a user message with nothing following, e.g. ``<|im_end|>\n<|im_start|>assistant\n``):
        when its ids end with exactly that text's ids, they are replaced by the delta of
        ``messages`` (which closes the user message, adds the new ones and opens the assistant
        turn again). Otherwise (a plain-text prompt) the delta is appended.
        """
        tail_text, tail_ids = self.delta_ids("user", [])
        text, ids = self.delta_ids("user", messages)
        if tail_ids and prompt_text.endswith(tail_text) and prompt_ids[-len(tail_ids):] == tail_ids:
            return prompt_ids[: -len(tail_ids)] + ids, prompt_text[: -len(tail_text)] + text
        return prompt_ids + ids, prompt_text + text

    def delta_ids(self, after: str, messages: list[dict], ended_on_eos: bool = False) -> tuple[str, list[int]]:
        """:meth:`delta_text` and its ids (tokenized on its own, no special tokens added)."""
        text = self.delta_text(after, messages, ended_on_eos)
        return text, list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class _Trajectory:
    item: PromptItem
    sample: int
    env: Any
    prompt_ids: list[int]
    prompt_text: str
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    turns: int = 0
    finish: str | None = None
    failed: str | None = None
    """Why reset failed: the model takes its first turn, then the trajectory ends (env_error)."""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.ids)


def turn_seed(base: int | None, prompt_index: int, sample: int, turn: int) -> int | None:
    """The engine seed of one turn of one trajectory: fixed by (base, prompt, sample, turn)."""
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{prompt_index}:{sample}:{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def _in_thread(fn: Callable, *args) -> concurrent.futures.Future:
    """``fn(*args)`` in a daemon thread: a hung environment never blocks the process's exit."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            result, error = None, e
        else:
            error = None
        try:
            fut.set_exception(error) if error is not None else fut.set_result(result)
        except concurrent.futures.InvalidStateError:  # the caller gave up waiting (timeout)
            pass

    threading.Thread(target=run, daemon=True, name="env-call").start()
    return fut


async def call_env(fn: Callable, arg: Any, timeout_s: float) -> Any:
    """``fn(arg)`` (sync, in a daemon thread, or async) within ``timeout_s`` (else ``TimeoutError``)."""
    if inspect.iscoroutinefunction(fn):
        return await asyncio.wait_for(fn(arg), timeout_s)
    result = await asyncio.wait_for(asyncio.wrap_future(_in_thread(fn, arg)), timeout_s)
    if inspect.isawaitable(result):
        return await asyncio.wait_for(result, timeout_s)
    return result


def _run_calls(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run coroutine factories concurrently; each result is a value or the exception it raised."""
    async def gather():
        return await asyncio.gather(*(c() for c in calls), return_exceptions=True)

    return asyncio.run(gather()) if calls else []


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within env.step_timeout_s={timeout_s:g}"
    return f"{type(exc).__name__}: {exc}"


def make_trajectories(items: Sequence[PromptItem], n: int, make_env: Callable[[], Any]) -> list[_Trajectory]:
    """``n`` trajectories of every prompt, ordered by (prompt, sample), each with a new environment."""
    return [_Trajectory(item, j, make_env(), list(item.prompt_ids), item.text) for item in items for j in range(n)]


def reset_call(t: _Trajectory, limits: TrajectoryLimits) -> Any:
    """The coroutine of ``t``'s ``reset`` call (its row's columns plus ``prompt_index``)."""
    return call_env(t.env.reset, {**t.item.columns, "prompt_index": t.item.index}, limits.step_timeout_s)


def apply_reset(t: _Trajectory, obs: Any, delta: TemplateDelta, limits: TrajectoryLimits) -> None:
    """Append the first observation (``obs``, or the exception ``reset`` raised) to the prompt."""
    if isinstance(obs, BaseException):
        t.failed = _describe(obs, limits.step_timeout_s)
        return
    msgs = as_messages(obs, t.env)
    if msgs:
        t.prompt_ids, t.prompt_text = delta.after_prompt(t.prompt_ids, t.prompt_text, msgs)
    if t.length >= limits.max_total_tokens:
        raise UserError(f"prompt {t.item.index} is {t.length} tokens with the environment's first observation, "
                        f"not below rollout.max_total_tokens={limits.max_total_tokens}; raise it")


def next_request(t: _Trajectory, limits: TrajectoryLimits, seed: int | None) -> TurnRequest:
    """``t``'s next turn: its ids so far, the room left, the turn's seed (:func:`turn_seed`)."""
    room = limits.max_total_tokens - t.length
    return TurnRequest(t.prompt_ids + t.ids, min(limits.max_new_tokens, room),
                       turn_seed(seed, t.item.index, t.sample, t.turns))


def take_turn(t: _Trajectory, req: TurnRequest, out: Sampled, limits: TrajectoryLimits) -> bool:
    """Append a sampled turn to ``t``; True when the environment steps next (False: ``reset`` had
    failed, the trajectory ends with ``env_error``)."""
    if len(out.logprobs) != len(out.token_ids):
        raise RuntimeError(f"sampler returned {len(out.logprobs)} log-probs for {len(out.token_ids)} tokens")
    t.ids += out.token_ids
    t.mask += [1] * len(out.token_ids)
    t.logprobs += [float(x) for x in out.logprobs]
    t.rewards += [0.0] * len(out.token_ids)
    t.text.append(out.text)
    t.turns += 1
    t.finish = out.finish_reason
    if out.finish_reason == "length" and req.max_tokens < limits.max_new_tokens:
        t.finish = "max_total_tokens"
    if t.failed is not None:
        log.warning("environment %s failed at reset for prompt %d sample %d: %s",
                    type(t.env).__name__, t.item.index, t.sample, t.failed)
        t.finish = "env_error"
        return False
    return True


def after_step(t: _Trajectory, res: Any, stats: EnvStats, delta: TemplateDelta, limits: TrajectoryLimits) -> None:
    """Apply ``step``'s result (or the exception it raised) to ``t``: its reward on the turn's last
    sampled id, then the end (``t.finish`` set) or the observation's ids (``t.finish`` None)."""
    if isinstance(res, UserError):
        raise res
    if isinstance(res, BaseException):
        log.warning("environment %s failed at turn %d of prompt %d sample %d: %s; ending the trajectory "
                    "(env_error)", type(t.env).__name__, t.turns, t.item.index, t.sample,
                    _describe(res, limits.step_timeout_s))
        t.finish = "env_error"
        return
    res = check_step(t.env, res)
    stats.tool_calls += int(res.info.get("tool_calls", 0) or 0)
    stats.tool_errors += int(res.info.get("tool_errors", 0) or 0)
    stats.reward_sum += res.reward
    last = max((i for i, m in enumerate(t.mask) if m), default=None)
    if last is not None:
        t.rewards[last] += res.reward
    if res.done:
        t.finish = "length" if t.finish in ("length", "max_total_tokens") else "stop"
        return
    if t.finish == "max_total_tokens":
        return
    if t.turns >= limits.max_turns:
        t.finish = "max_turns"
        return
    msgs = as_messages(res.observation, t.env)
    ended_on_eos = bool(t.ids) and t.ids[-1] in delta.eos_ids
    text, ids = delta.delta_ids("assistant", msgs, ended_on_eos)
    if t.length + len(ids) >= limits.max_total_tokens:  # no room for the observation and a turn
        t.finish = "max_total_tokens"
        return
    t.ids += ids
    t.mask += [0] * len(ids)
    t.logprobs += [0.0] * len(ids)
    t.rewards += [0.0] * len(ids)
    t.text.append(text)
    stats.observation_tokens += len(ids)
    t.finish = None


def to_batch(items: Sequence[PromptItem], trajs: list[_Trajectory], stats: EnvStats, policy_version: int,
             generator_id: str) -> RolloutBatch:
    """The finished trajectories as one :class:`RolloutBatch` (and their turn and error counts in ``stats``)."""
    stats.trajectories = len(trajs)
    stats.turns = sum(t.turns for t in trajs)
    stats.errors = sum(t.finish == "env_error" for t in trajs)
    return RolloutBatch.from_sequences(
        prompt_index=[t.item.index for t in trajs], sample_index=[t.sample for t in trajs],
        prompt_ids=[t.prompt_ids for t in trajs], response_ids=[t.ids for t in trajs],
        sampler_logprobs=[t.logprobs for t in trajs], prompt=[t.prompt_text for t in trajs],
        response=["".join(t.text) for t in trajs], finish_reason=[t.finish for t in trajs],
        policy_version=policy_version, generator_id=generator_id,
        columns={k: [t.item.columns[k] for t in trajs] for k in (items[0].columns if items else {})},
        loss_mask=[t.mask for t in trajs], token_reward=[t.rewards for t in trajs],
    )


def run_trajectories(items: Sequence[PromptItem], n: int, sampler: Sampler, make_env: Callable[[], Any],
                     delta: TemplateDelta, limits: TrajectoryLimits, seed: int | None = None,
                     policy_version: int = 0, generator_id: str = "") -> tuple[RolloutBatch, EnvStats]:
    """``n`` trajectories of every prompt of ``items``, ordered by (prompt, sample), and their stats;
    turn-synchronous (one engine call per turn of all live trajectories).

    ``make_env()``: a new environment instance (one per trajectory). ``delta``: renders the
    observations. A ``step`` that returns the wrong shape raises :class:`UserError` (naming the
    class); one that raises or times out ends its trajectory with ``env_error``.
    """
    stats = EnvStats()
    start = time.perf_counter()
    trajs = make_trajectories(items, n, make_env)

    # reset: the first observation, appended to the prompt as a user message
    t0 = time.perf_counter()
    firsts = _run_calls([lambda t=t: reset_call(t, limits) for t in trajs])
    stats.seconds += time.perf_counter() - t0
    for t, obs in zip(trajs, firsts):
        apply_reset(t, obs, delta, limits)

    live = list(trajs)
    while live:
        requests = [next_request(t, limits, seed) for t in live]
        t0 = time.perf_counter()
        outs = sampler(requests)
        stats.engine_seconds += time.perf_counter() - t0
        stepping = [t for t, req, out in zip(live, requests, outs) if take_turn(t, req, out, limits)]
        t0 = time.perf_counter()
        results = _run_calls([lambda t=t: call_env(t.env.step, t.text[-1], limits.step_timeout_s) for t in stepping])
        stats.seconds += time.perf_counter() - t0
        for t, res in zip(stepping, results):
            after_step(t, res, stats, delta, limits)
        live = [t for t in live if t.finish is None]

    stats.wall_seconds = time.perf_counter() - start
    return to_batch(items, trajs, stats, policy_version, generator_id), stats
