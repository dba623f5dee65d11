"""One agent rollout's conversation as one trajectory, token in and token out (no vLLM, no HTTP).

An agent written against the OpenAI client (``async def rollout(client, row) -> reward``, see
:mod:`ray_rlhf.generation.openai_endpoint`) sends chat-completion requests, each carrying the whole
conversation as messages. A :class:`Session` turns them into the exact ids the engine sees:

* the first request's messages are rendered with the chat template once and tokenized: the
  trajectory's prompt ids;
* the engine samples a completion from ``prompt ids + ids so far``: its ids and log-probs are kept
  as sampled (loss mask 1) and its text is the assistant message returned to the agent;
* every later request must *extend* the conversation: the previous request's messages, then the
  assistant message the endpoint returned (same role and content), then new messages. Only the new
  messages are rendered, as the template's delta after an assistant turn
  (:meth:`~ray_rlhf.generation.trajectory.TemplateDelta.delta_ids`), and appended (loss mask 0) to
  the sampled ids; earlier turns are never tokenized again. A request that does not extend it is
  refused (:class:`SessionError`, an HTTP 400 naming the first message that differs).

When ``rollout`` returns, :meth:`Session.close` puts its reward on the last sampled token (the
rollout log's ``token_reward``, as an environment's turn reward) and the session becomes one row of
the multi-turn record (:func:`sessions_to_batch`). Finish reasons: ``stop`` (the agent returned a
reward), ``length`` (it did, but its last completion was cut at ``rollout.max_new_tokens``),
``max_turns`` (it asked for more than ``env.max_turns`` completions), ``max_total_tokens`` (the
conversation reached ``rollout.max_total_tokens``), ``env_error`` (it raised, returned something
other than a number, or took longer than ``env.step_timeout_s`` between two requests).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ray_rlhf.envs.tools import parse_hermes
from ray_rlhf.generation.trajectory import EnvStats, Sampled, TemplateDelta, TrajectoryLimits, TurnRequest, turn_seed
from ray_rlhf.records import PromptItem, RolloutBatch

__all__ = ["Session", "SessionError", "message_key", "response_message", "sessions_to_batch"]


class SessionError(Exception):
    """A request the session refuses: ``status`` (HTTP), ``code`` (OpenAI's error code) and a message
    the agent's developer can act on. ``finish``: the finish reason it ends the trajectory with, or
    None when the session stays usable (a malformed request)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", finish: str | None = None):
        super().__init__(message)
        self.status, self.code, self.finish = status, code, finish


def _content(content: Any) -> str:
    """A message's content as text: a string, None (""), or OpenAI content parts (their ``text``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise SessionError("only text content parts are supported ({'type': 'text', 'text': ...})")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise SessionError(f"message content of type {type(content).__name__}; send a string or text parts")


def _tool_calls(calls: Any) -> list[dict]:
    """OpenAI ``tool_calls`` as the chat templates read them: ``{"type": "function", "function":
    {"name", "arguments": <dict>}}`` (``arguments`` parsed from its JSON string; ids dropped)."""
    out = []
    for c in calls if isinstance(calls, list) else []:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise SessionError("a tool call needs {'type': 'function', 'function': {'name', 'arguments'}}")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise SessionError(f"tool call {fn['name']!r}: arguments are not JSON") from None
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def message_key(message: Any) -> dict:
    """A request message reduced to what the chat template reads: ``{"role", "content"}`` (and
    ``name`` / ``tool_call_id`` / ``tool_calls`` when given). Extra fields the OpenAI client adds to
    a returned message (``refusal``, ``tool_calls: None``, call ids ...) are dropped."""
    if not isinstance(message, dict) or "role" not in message:
        raise SessionError("every message needs a 'role' and a 'content'")
    out = {"role": str(message["role"]), "content": _content(message.get("content"))}
    for extra in ("name", "tool_call_id"):
        if message.get(extra) is not None:
            out[extra] = str(message[extra])
    if message.get("tool_calls"):
        out["tool_calls"] = _tool_calls(message["tool_calls"])
    return out


def response_message(text: str, turn: int) -> tuple[dict, bool]:
    """The assistant message returned for a completion's ``text``, and whether it calls tools: the
    Hermes / Qwen ``<tool_call>{json}</tool_call>`` blocks
    (:func:`~ray_rlhf.envs.tools.parse_hermes`) become OpenAI ``tool_calls`` (ids ``call_<turn>_<k>``)
    and the rest of the text its ``content`` (None when empty). A malformed block is left in the
    content as text."""
    parsed = parse_hermes(text)
    if not parsed.calls or parsed.errors:
        return {"role": "assistant", "content": text}, False
    rest = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.DOTALL).strip()
    calls = [{"id": f"call_{turn}_{k}", "type": "function",
              "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for k, c in enumerate(parsed.calls)]
    return {"role": "assistant", "content": rest or None, "tool_calls": calls}, True


@dataclass
class Session:
    """The trajectory of one agent rollout: ``n``-th sample ``sample`` of prompt ``item``."""

    item: PromptItem
    sample: int
    delta: TemplateDelta
    limits: TrajectoryLimits
    seed: int | None = None
    prompt_ids: list[int] = field(default_factory=list)
    prompt_text: str = ""
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    """The conversation so far, as the next request must start: every message sent, and every
    assistant message returned."""
    turns: int = 0
    observation_tokens: int = 0
    finish: str | None = None
    """Set once the trajectory is over (a limit reached, or :meth:`close`)."""
    tools: list[dict] | None = None
    """The first request's ``tools`` (rendered by the chat template; calls parsed from completions)."""
    busy: bool = False
    """A request of this session is with the engine (a second one at the same time is refused)."""
    idle_since: float = field(default_factory=time.monotonic)
    """When the agent last got the turn back (created, or a completion returned)."""
    last_finish: str = "stop"

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.ids)

    def prepare(self, messages: Sequence[Any], max_tokens: int | None = None, tools: Any = None) -> TurnRequest:
        """The engine request for a chat-completion request with ``messages`` (appending the new
        messages' ids), or a :class:`SessionError`. ``max_tokens``: the request's cap (further capped
        by ``rollout.max_new_tokens`` and the room left under ``rollout.max_total_tokens``).
        ``tools``: the request's JSON-schema tools, passed to the chat template; the same in every
        request of a rollout."""
        if self.finish is not None:
            raise SessionError(f"this rollout's trajectory has ended ({self.finish}); no further completions",
                               code=self.finish)
        if self.busy:
            raise SessionError("a completion of this session is still being generated: one rollout's requests "
                               "must be sequential (give a parallel call its own rollout)")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise SessionError("'messages' must be a non-empty list")
        msgs = [message_key(m) for m in messages]
        tools = list(tools) if tools else None
        if self.messages and tools != self.tools:
            raise SessionError("'tools' must stay the same in every request of a rollout")
        if self.turns >= self.limits.max_turns:
            self.finish = "max_turns"
            raise SessionError(f"env.max_turns={self.limits.max_turns} completions per rollout reached",
                               code="max_turns", finish="max_turns")
        if not self.messages:
            if tools:
                self.tools, self.delta = tools, TemplateDelta(self.delta.tokenizer, tools)
            text = self.delta.render(msgs, add_generation_prompt=True)
            special = self.delta.template is not None  # the fallback template renders no BOS
            ids = list(self.delta.tokenizer(text, add_special_tokens=special)["input_ids"])
            if len(ids) >= self.limits.max_total_tokens:
                self.finish = "max_total_tokens"
                raise SessionError(f"the first request's messages are {len(ids)} tokens, not below "
                                   f"rollout.max_total_tokens={self.limits.max_total_tokens}",
                                   code="context_length_exceeded", finish="max_total_tokens")
            self.prompt_ids, self.prompt_text = ids, text
        else:
            known = len(self.messages)
            differs = next((i for i, (a, b) in enumerate(zip(msgs, self.messages)) if a != b), None)
            if differs is not None or len(msgs) <= known:
                where = (f"message {differs} differs from the conversation so far ({self.messages[differs]!r:.120})"
                         if differs is not None else f"it has {len(msgs)} messages, the conversation so far {known}")
                raise SessionError(
                    "a request must extend this rollout's conversation (the previous messages, the assistant "
                    f"message returned, then new ones): {where}; start a new rollout for a different conversation")
            new = msgs[known:]
            ended_on_eos = bool(self.ids) and self.ids[-1] in self.delta.eos_ids
            text, ids = self.delta.delta_ids("assistant", new, ended_on_eos)
            if self.length + len(ids) >= self.limits.max_total_tokens:
                self.finish = "max_total_tokens"
                raise SessionError(f"the conversation would be {self.length + len(ids)} tokens, not below "
                                   f"rollout.max_total_tokens={self.limits.max_total_tokens}",
                                   code="context_length_exceeded", finish="max_total_tokens")
            self._append(ids, [0] * len(ids), [0.0] * len(ids), text)
            self.observation_tokens += len(ids)
        self.messages = msgs
        room = self.limits.max_total_tokens - self.length
        cap = self.limits.max_new_tokens if max_tokens is None else min(int(max_tokens), self.limits.max_new_tokens)
        self.busy = True
        return TurnRequest(self.prompt_ids + self.ids, max(1, min(cap, room)),
                           turn_seed(self.seed, self.item.index, self.sample, self.turns))

    def record(self, request: TurnRequest, out: Sampled) -> tuple[dict, str]:
        """Append a completion as sampled; returns the assistant message and the finish reason the
        agent is told (``stop``, ``length``, or ``tool_calls`` when the request declared ``tools``
        and the text holds calls, :func:`response_message`)."""
        if len(out.logprobs) != len(out.token_ids):
            raise RuntimeError(f"sampler returned {len(out.logprobs)} log-probs for {len(out.token_ids)} tokens")
        self.busy, self.idle_since = False, time.monotonic()
        self._append(list(out.token_ids), [1] * len(out.token_ids), [float(x) for x in out.logprobs], out.text)
        message, calls = response_message(out.text, self.turns) if self.tools else ({"role": "assistant",
                                                                                   "content": out.text}, False)
        self.messages = [*self.messages, message_key(message)]
        self.turns += 1
        self.last_finish = out.finish_reason
        if out.finish_reason == "length" and self.length >= self.limits.max_total_tokens:
            self.finish = "max_total_tokens"
        return message, "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason

    def release(self) -> None:
        """The engine failed on this session's request: it may send another."""
        self.busy, self.idle_since = False, time.monotonic()

    def _append(self, ids: list[int], mask: list[int], logprobs: list[float], text: str) -> None:
        self.ids += ids
        self.mask += mask
        self.logprobs += logprobs
        self.rewards += [0.0] * len(ids)
        self.text.append(text)

    def close(self, reward: Any = None, error: str | None = None) -> float:
        """The rollout is over: its reward goes on the last sampled token (0 with ``error``, or when
        no completion was sampled). Returns the reward recorded."""
        value = 0.0
        if error is not None:
            self.finish = self.finish or "env_error"  # a limit the agent ran into keeps its own reason
        else:
            try:
                value = float(reward)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                self.finish, value = "env_error", 0.0
            elif self.finish is None:
                self.finish = "length" if self.last_finish == "length" else "stop"
        last = max((i for i, m in enumerate(self.mask) if m), default=None)
        if last is None:
            return 0.0
        self.rewards[last] += value
        return value


def sessions_to_batch(sessions: Sequence[Session], columns: Sequence[str], policy_version: int = 0,
                      generator_id: str = "") -> tuple[RolloutBatch, EnvStats]:
    """One row per session, in order, and the shard's counts (``seconds`` left to the caller).

    A session that never got a completion (the agent failed first) is the dataset's prompt with an
    empty response (finish ``env_error``)."""
    stats = EnvStats(trajectories=len(sessions))
    for s in sessions:
        if not s.prompt_ids:
            s.prompt_ids, s.prompt_text = list(s.item.prompt_ids), s.item.text
        stats.turns += s.turns
        stats.observation_tokens += s.observation_tokens
        stats.errors += s.finish == "env_error"
        stats.reward_sum += float(sum(s.rewards))
    batch = RolloutBatch.from_sequences(
        prompt_index=[s.item.index for s in sessions], sample_index=[s.sample for s in sessions],
        prompt_ids=[s.prompt_ids for s in sessions], response_ids=[s.ids for s in sessions],
        sampler_logprobs=[s.logprobs for s in sessions], prompt=[s.prompt_text for s in sessions],
        response=["".join(s.text) for s in sessions], finish_reason=[s.finish or "env_error" for s in sessions],
        policy_version=policy_version, generator_id=generator_id,
        columns={k: [s.item.columns[k] for s in sessions] for k in columns},
        loss_mask=[s.mask for s in sessions], token_reward=[s.rewards for s in sessions],
    )
    return batch, stats
