"""The environment interface of multi-turn rollouts, and loading one from the config.

An environment answers the model turn by turn. Each trajectory gets its own instance
(``cls(**env.kwargs)``); the generator calls

* ``reset(row) -> observation``: ``row`` is the prompt's dataset row (its columns besides the
  prompt, e.g. ``answer``); the observation (a string, or None for none) is appended to the prompt
  as a user message before the model's first turn;
* ``step(action) -> (observation, reward, done, info)`` (or a :class:`StepResult`): ``action`` is the
  model's turn as text; ``reward`` is that turn's reward (it lands on the turn's last token,
  :attr:`~ray_rlhf.records.RolloutBatch.token_reward`); ``observation`` is appended as the next
  user (or ``tool``) message unless ``done``; ``info`` is a dict (``tool_calls``, ``tool_errors``
  are counted into the metrics).

Either method may be ``async def``. An observation may also be a message dict
(``{"role": "tool", "content": ...}``) or a list of them. Environments declare their tools (JSON
schemas passed to the chat template) in ``tools`` (:mod:`ray_rlhf.envs.tools`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from ray_rlhf.errors import UserError

__all__ = ["Env", "StepResult", "as_messages", "check_step", "check_tools", "env_tools", "import_attr", "load_agent", "load_env_class"]


@dataclass(frozen=True)
class StepResult:
    """What one ``step`` returns (a 4-tuple ``(observation, reward, done, info)`` is accepted too)."""

    observation: Any = None
    """The environment's answer: a string (a ``user`` message), a message dict, a list of them, or
    None (nothing to append; usual with ``done``)."""
    reward: float = 0.0
    """This turn's reward, put on the turn's last model token."""
    done: bool = False
    """The trajectory is over (finish reason ``stop``)."""
    info: dict = field(default_factory=dict)
    """Free-form; ``tool_calls`` and ``tool_errors`` (ints) are summed into the metrics."""


class Env:
    """Base class of environments (subclassing it is optional: any class with ``reset`` and
    ``step`` works). ``tools``: JSON schemas of the tools the model may call (the chat template's
    ``tools=``); empty for none."""

    tools: list[dict] = []

    def reset(self, row: dict) -> Any:
        """The first observation (None: the prompt alone starts the conversation)."""
        return None

    def step(self, action: str) -> StepResult | tuple:
        raise NotImplementedError


def import_attr(name: str, key: str, form: str, example: str) -> Any:
    """The attribute named ``module:attr``; a :class:`UserError` naming the config ``key`` and the fix."""
    module_name, sep, attr = str(name).partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{key}={name!r}: expected '{form}', e.g. {example}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"{key}={name}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                        "check the name and that the module is on PYTHONPATH") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UserError(f"{key}={name}: module {module_name!r} has no attribute {attr!r}")
    return obj


def load_env_class(name: str) -> type:
    """The class named ``module:Class``; a :class:`UserError` naming ``env.name`` and the fix."""
    cls = import_attr(name, "env.name", "module:Class", "ray_rlhf.envs.letters:LetterGame")
    if not inspect.isclass(cls) or not callable(getattr(cls, "step", None)) or not callable(getattr(cls, "reset", None)):
        raise UserError(f"env.name={name} is not a class with reset(row) and step(action) methods")
    return cls


def env_tools(name: str) -> list[dict] | None:
    """The tool schemas the environment class ``name`` declares (its ``tools``, checked with
    :func:`check_tools`), as the chat template's ``tools=``; None when it declares none."""
    tools = getattr(load_env_class(name), "tools", None)
    return check_tools(tools, name) if tools else None


def load_agent(name: str, kwargs: dict | None = None) -> Any:
    """The agent named ``module:function`` (``env.agent``): an ``async def rollout(client, row,
    **kwargs) -> reward`` written against the OpenAI client; a :class:`UserError` naming
    ``env.agent`` and the fix when it cannot be imported, is not an async function, or does not
    take ``(client, row)`` and ``kwargs``."""
    fn = import_attr(name, "env.agent", "module:function", "my_agents:rollout")
    if not inspect.iscoroutinefunction(fn):
        raise UserError(f"env.agent={name} is not an async function; define it as "
                        "`async def rollout(client, row) -> float`")
    try:
        inspect.signature(fn).bind(None, {}, **(kwargs or {}))
    except TypeError as e:
        raise UserError(f"env.agent={name} cannot be called as rollout(client, row, **env.kwargs) ({e}); define it as "
                        "`async def rollout(client, row, **kwargs) -> float`") from None
    return fn


def check_step(env: Any, result: Any) -> StepResult:
    """``result`` of ``env.step`` as a :class:`StepResult`; a :class:`UserError` naming the class
    when it has the wrong shape."""
    if isinstance(result, StepResult):
        out = result
    elif isinstance(result, tuple) and len(result) == 4:
        obs, reward, done, info = result
        out = StepResult(obs, reward, done, {} if info is None else info)
    else:
        shape = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise UserError(f"{type(env).__module__}:{type(env).__name__}.step returned {shape}; return "
                        "(observation, reward, done, info) or a ray_rlhf.envs.base.StepResult")
    try:
        reward = float(out.reward)
    except (TypeError, ValueError):
        reward = math.nan
    if not math.isfinite(reward):
        raise UserError(f"{type(env).__module__}:{type(env).__name__}.step returned reward {out.reward!r}; "
                        "return a finite number")
    if not isinstance(out.info, dict):
        raise UserError(f"{type(env).__module__}:{type(env).__name__}.step returned info of type "
                        f"{type(out.info).__name__}; return a dict")
    as_messages(out.observation, env)  # checks the observation's shape
    return StepResult(out.observation, reward, bool(out.done), out.info)


def as_messages(observation: Any, env: Any = None) -> list[dict]:
    """An observation as chat messages: a string is one ``user`` message; None is none."""
    if observation is None:
        return []
    if isinstance(observation, str):
        return [{"role": "user", "content": observation}]
    items = [observation] if isinstance(observation, dict) else observation
    if isinstance(items, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in items):
        return [dict(m) for m in items]
    who = f"{type(env).__module__}:{type(env).__name__}" if env is not None else "the environment"
    raise UserError(f"{who} returned an observation of type {type(observation).__name__}; return a string, "
                    "a {role, content} message, a list of them, or None")


def check_tools(tools: Any, who: str) -> list[dict]:
    """``tools`` as JSON-schema function specs (the OpenAI / chat-template form:
    ``{"type": "function", "function": {"name", "description", "parameters": {"type": "object",
    "properties": {...}, "required": [...]}}}``); a :class:`UserError` naming ``who`` and the tool."""
    if not isinstance(tools, (list, tuple)):
        raise UserError(f"{who}.tools is a {type(tools).__name__}; give a list of JSON-schema function specs")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        where = f"{who}.tools[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise UserError(f"{where}: expected {{'type': 'function', 'function': {{'name', 'description', "
                            "'parameters'}}}")
        if not isinstance(name, str) or not name.isidentifier():
            raise UserError(f"{where}: function.name must be an identifier, got {name!r}")
        if name in names:
            raise UserError(f"{where}: tool {name!r} is declared twice")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        props = params.get("properties", {}) if isinstance(params, dict) else None
        if not isinstance(params, dict) or params.get("type") != "object" or not isinstance(props, dict):
            raise UserError(f"{where}: function.parameters must be a JSON schema of type 'object' with "
                            "'properties' (a dict)")
        bad = [k for k, v in props.items() if not isinstance(v, dict) or "type" not in v]
        if bad:
            raise UserError(f"{where}: parameter {bad[0]!r} needs a JSON schema with a 'type'")
        missing = [r for r in params.get("required", []) if r not in props]
        if missing:
            raise UserError(f"{where}: required parameter {missing[0]!r} is not in 'properties'")
    return [dict(t) for t in tools]
