"""Tool use on the environment interface: tools are Python methods with JSON schemas.

A :class:`ToolEnv` subclass lists its tools' JSON schemas in ``tools`` (passed to the chat template
as ``tools=``, so a chat model's template shows them) and implements each as a method of the same
name. Each model turn is parsed for calls (:func:`parse_hermes`, the Hermes / Qwen
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` format, by default; any
``parser(text) -> ParsedCalls`` may replace it, e.g. ``parser="my_module:parse"``):

* one or more calls: each runs, its result (``json.dumps`` unless a string) comes back as a
  ``tool`` message; a malformed call, an unknown tool, arguments the method rejects or a method
  that raises give an error ``tool`` message instead (counted as ``env/tool_errors``), never a crash;
* no call: the turn is the final answer; :meth:`ToolEnv.reward` scores it and the trajectory ends.

Example (docs/agents.md)::

    class Calculator(ToolEnv):
        tools = [{"type": "function", "function": {
            "name": "add", "description": "a + b",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                           "required": ["a", "b"]}}}]

        def add(self, a, b):
            return a + b

        def reward(self, answer):
            return float(str(self.row.get("answer")) in answer)
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray_rlhf.envs.base import Env, StepResult, check_tools
from ray_rlhf.errors import UserError

__all__ = ["ParsedCalls", "ToolCall", "ToolEnv", "parse_hermes"]

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class ParsedCalls:
    """The calls found in one model turn, and one message per call that could not be parsed."""

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.calls or self.errors)


def parse_hermes(text: str) -> ParsedCalls:
    """Hermes / Qwen tool calls: ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>`` blocks
    (``arguments`` may also be a JSON string). An unclosed block, invalid JSON or a call without a
    string ``name`` / object ``arguments`` is an error."""
    calls, errors = [], []
    for m in _BLOCK.finditer(text):
        body, closed = m.group(1).strip(), bool(m.group(2))
        if not closed:
            errors.append("malformed tool call: <tool_call> without </tool_call>")
            continue
        try:
            obj = json.loads(body)
        except ValueError as e:
            errors.append(f"malformed tool call: not JSON ({e.msg} at {e.pos})")
            continue
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            errors.append('malformed tool call: expected {"name": <string>, "arguments": <object>}')
            continue
        calls.append(ToolCall(obj["name"], args))
    return ParsedCalls(calls, errors)


def _resolve_parser(parser: str | Callable | None) -> Callable[[str], ParsedCalls]:
    if parser is None:
        return parse_hermes
    if callable(parser):
        return parser
    module, _, name = str(parser).partition(":")
    return getattr(importlib.import_module(module), name)


class ToolEnv(Env):
    """An environment whose tools are this class's methods (see the module docstring).

    Args:
        parser: ``module:function`` or a callable ``text -> ParsedCalls``; default :func:`parse_hermes`.
        max_calls: most tool calls run per turn (the rest get an error message).

    ``self.row`` holds the prompt row given to :meth:`reset` (e.g. its ``answer`` column).
    """

    tools: list[dict] = []

    def __init__(self, parser: str | Callable | None = None, max_calls: int = 4):
        self.tools = check_tools(type(self).tools, f"{type(self).__module__}:{type(self).__name__}")
        self.names = {t["function"]["name"] for t in self.tools}
        missing = sorted(n for n in self.names if not callable(getattr(self, n, None)))
        if missing:
            raise UserError(f"{type(self).__name__} declares tool {missing[0]!r} but has no method of that name")
        self.parser = _resolve_parser(parser)
        self.max_calls = int(max_calls)
        self.row: dict = {}

    def reset(self, row: dict) -> Any:
        self.row = dict(row)
        return None

    def reward(self, answer: str) -> float:
        """The final answer's reward (a turn without tool calls ends the trajectory). Default 0."""
        return 0.0

    def call(self, call: ToolCall) -> Any:
        """Run one call: the method named ``call.name`` with ``call.arguments`` as keywords."""
        return getattr(self, call.name)(**call.arguments)

    def step(self, action: str) -> StepResult:
        parsed = self.parser(action)
        if not parsed.any:
            return StepResult(None, float(self.reward(action)), True, {"tool_calls": 0, "tool_errors": 0})
        messages, errors = [], 0
        for err in parsed.errors:
            messages.append({"role": "tool", "content": f"error: {err}"})
            errors += 1
        for k, c in enumerate(parsed.calls):
            ok = False
            if k >= self.max_calls:
                content = f"error: more than {self.max_calls} tool calls in one turn; {c.name} not run"
            elif c.name not in self.names:
                content = f"error: unknown tool {c.name!r}; available: {', '.join(sorted(self.names))}"
            else:
                try:
                    result = self.call(c)
                    content, ok = (result if isinstance(result, str) else json.dumps(result)), True
                except Exception as e:  # noqa: BLE001 - the model's bad call, reported back to it
                    content = f"error: {c.name} raised {type(e).__name__}: {e}"
            errors += not ok
            messages.append({"role": "tool", "content": content})
        return StepResult(messages, 0.0, False,
                          {"tool_calls": len(parsed.calls) + len(parsed.errors), "tool_errors": errors})
