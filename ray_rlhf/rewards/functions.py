"""Python reward functions that see the dataset's other columns, per sample or per batch.

A prompt row may carry columns besides its prompt (``answer``, ``letter``, ``data_source``, ...).
They reach a reward function as keyword arguments, in one of two declared forms (``kind``):

* ``"sample"`` (default): ``fn(prompt: str, response: str, **columns) -> float``, called once per
  sample with that sample's column values;
* ``"batch"``: ``fn(prompts: list[str], responses: list[str], **columns) -> list[float]``, called
  once with the whole batch and every column as a list (a judge model wants the batch at once).

Either may be ``async def``: a batched one is awaited; per-sample ones run concurrently with
``asyncio.gather``, at most ``max_concurrency`` at a time.

A function takes only the columns it names: a column is passed when the function has a keyword
parameter of that name (after the leading ``prompt, response``), or every column is passed when it
has ``**kwargs``. A column named like one of those two leading parameters is never passed. A
parameter with a default and no matching column keeps its default, so
``ray_rlhf.rewards.rules:letter_frequency(prompt, response, letter="e")`` reads the row's
``letter`` when the dataset has one.

:func:`resolve_reward_fn` imports ``module:function`` and checks its signature against the
declared form and the dataset's columns, before any expensive work; every problem is a one-line
:class:`~ray_rlhf.errors.UserError`. Calling the returned :class:`RewardFn` scores a batch and
checks every value is a finite number; a function that raises or returns anything else fails the
whole batch with a :class:`RewardError` naming the function and the sample (its position in the
batch is also in the error's ``batch_index`` attribute).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ray_rlhf.errors import UserError

__all__ = ["KINDS", "RewardFn", "resolve_reward_fn", "RewardError"]

KINDS = ("sample", "batch")
"""The accepted values of a reward function's ``kind``."""

FORMS = ("fn(prompt: str, response: str, **columns) -> float (kind: sample) or "
         "fn(prompts: list[str], responses: list[str], **columns) -> list[float] (kind: batch)")

_FIX_IMPORT = "check the spec and that the module is importable (PYTHONPATH / --working-dir)"
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
Names = tuple[str, ...]


class RewardError(UserError):
    """A reward source failed on a sample, or returned something other than a finite number.

    The one reward-failure class of the package: :mod:`ray_rlhf.rewards.remote` raises it too.
    It lives here, below the scorer, so that the scorer can import this module (and re-export the
    class) without an import cycle.
    """

    def __init__(self, message: str, source: str = "", prompt_index: int | None = None,
                 sample_index: int | None = None, batch_index: int | None = None):
        super().__init__(message)
        self.source = source
        """The failing source: a ``module:function`` spec, a URL, or ``"model"``."""
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.batch_index = batch_index
        """Position of the failing sample in the scored batch; None when the whole batch failed."""


# ----------------------------------------------------------------------------------- import


def _import_spec(spec: str) -> Any:
    """The object ``module:attr`` names (``attr`` may be dotted); one-line UserError otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise UserError(f"reward function spec {spec!r} is malformed; write it as 'module:function', "
                        "e.g. 'ray_rlhf.rewards.verifiable:target_letter_frequency'")
    module_name, attr_path = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UserError(f"reward function {spec!r}: module {exc.name!r} not found; {_FIX_IMPORT}") from exc
        raise UserError(f"reward function {spec!r}: importing module {module_name!r} failed: {exc}; "
                        "install the missing package in the runtime environment") from exc
    except Exception as exc:  # the user module's own bug: SyntaxError, NameError at import time, ...
        raise UserError(f"reward function {spec!r}: importing module {module_name!r} raised "
                        f"{type(exc).__name__}: {exc}; fix the module") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr_path!r}; "
                            "check the function name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward function {spec!r} is a {type(obj).__name__}, not a function; point it at "
                        f"a function {FORMS}")
    return obj


def _is_async(fn: Callable) -> bool:
    """True for an ``async def`` function, a partial of one, or an object with ``async def __call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004 - an async __call__


# -------------------------------------------------------------------------------- signature


def _leading_names(sig: inspect.Signature) -> tuple[str, ...]:
    """Names of the (up to two) leading positional parameters that receive prompt and response."""
    names: list[str] = []
    for p in sig.parameters.values():
        if len(names) == 2 or p.kind not in _POSITIONAL:
            break
        names.append(p.name)
    return tuple(names)


def _check_signature(spec: str, fn: Callable, columns: Sequence[str]) -> tuple[Names | None, Names, Names]:
    """``(wanted, required, leading)``: the column names the function takes (None: all, via
    ``**kwargs``), the keyword parameters it requires, and the names of its two leading parameters.

    Raises :class:`UserError` when it cannot be called as ``fn(prompt, response, **columns)``.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; pass no columns, the first call will tell
        return (), (), ()
    params = list(sig.parameters.values())
    leading = _leading_names(sig)
    rest = [p for p in params if p.name not in leading]
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    wanted = None if has_var_kw else tuple(p.name for p in rest if p.kind in _KEYWORD)
    required = tuple(p.name for p in rest if p.kind in _KEYWORD and p.default is inspect.Parameter.empty)
    try:
        sig.bind("prompt", "response", **{name: None for name in required})
    except TypeError as exc:
        raise UserError(f"reward function {spec!r} has signature {sig}, which fits neither accepted form: "
                        f"{FORMS} ({exc}); change its signature") from exc
    available = [c for c in columns if c not in leading]
    missing = [name for name in required if name not in available]
    if missing:
        what = "parameters" if len(missing) > 1 else "parameter"
        listed = ", ".join(repr(c) for c in available) or "none"
        raise UserError(f"reward function {spec!r} requires {what} {', '.join(repr(m) for m in missing)}, which no "
                        f"dataset column provides (available columns: {listed}); add the column to the prompt "
                        "file or give the parameter a default")
    return wanted, required, leading


def resolve_reward_fn(spec: str, kind: str = "sample", columns: Sequence[str] = (),
                      max_concurrency: int = 32) -> RewardFn:
    """Import the reward function ``module:function`` and check it fits form ``kind``.

    Args:
        spec: ``"module:function"`` (``function`` may be dotted, e.g. ``Class.method``).
        kind: ``"sample"`` (``fn(prompt, response, **columns) -> float``) or ``"batch"``
            (``fn(prompts, responses, **columns) -> list[float]``).
        columns: the dataset's extra column names, available as keyword arguments. Every keyword
            parameter the function requires (no default) must be one of them.
        max_concurrency: at most this many per-sample ``async`` calls run at once.

    Raises :class:`UserError` (one line naming the spec) for a malformed spec, a missing module,
    a module that fails to import, a missing attribute, a non-callable, a signature that fits
    neither form, or a required parameter no column provides.
    """
    if kind not in KINDS:
        raise UserError(f"reward function {spec!r} has kind {kind!r}; use 'sample' (fn(prompt, response) -> float) "
                        "or 'batch' (fn(prompts, responses) -> list[float])")
    if not isinstance(max_concurrency, int) or max_concurrency <= 0:
        raise UserError(f"reward function {spec!r}: max_concurrency is {max_concurrency!r}; give a positive integer")
    fn = _import_spec(spec)
    wanted, required, leading = _check_signature(spec, fn, columns)
    return RewardFn(spec=spec, fn=fn, kind=kind, wanted=wanted, required=required, leading=leading,
                    is_async=_is_async(fn), max_concurrency=max_concurrency)


# ------------------------------------------------------------------------------------- call


def _excerpt(text: Any, n: int = 40) -> str:
    text = str(text)
    return repr(text[:n]) + ("..." if len(text) > n else "")


def _short_repr(value: Any, n: int = 30) -> str:
    text = repr(value)
    return text[:n] + ("..." if len(text) > n else "")


def _as_finite_float(value: Any) -> float | None:
    """``float(value)`` for a real number (Python, NumPy or 1-element tensor); None if not one."""
    if isinstance(value, (str, bytes, complex)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return out if math.isfinite(out) else None


def _run_sync(coro) -> Any:
    """Run ``coro`` to completion from synchronous code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # e.g. inside a Ray async actor
        return pool.submit(asyncio.run, coro).result()


class RewardFn:
    """A resolved reward function: scores a batch in its declared form. Build with :func:`resolve_reward_fn`.

    Attributes:
        spec: the ``module:function`` spec, used in every message.
        fn: the imported callable.
        kind: ``"sample"`` or ``"batch"``.
        wanted: column names the function accepts as keywords; None means all (``**kwargs``).
        required: keyword parameters without a default; each must be a column of the batch.
        leading: names of its two leading parameters; a column of the same name is never passed.
        is_async: the function is ``async def`` (awaited; per-sample calls run concurrently).
        max_concurrency: at most this many per-sample async calls at once.
    """

    def __init__(self, spec: str, fn: Callable, kind: str, wanted: tuple[str, ...] | None,
                 required: tuple[str, ...], leading: tuple[str, ...], is_async: bool, max_concurrency: int):
        self.spec, self.fn, self.kind = spec, fn, kind
        self.wanted, self.required, self.leading = wanted, required, leading
        self.is_async, self.max_concurrency = is_async, max_concurrency

    def __repr__(self) -> str:
        return f"RewardFn({self.spec!r}, kind={self.kind!r}{', async' if self.is_async else ''})"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 where: Sequence[str] | None = None) -> list[float]:
        """One finite float per sample.

        Args:
            prompts, responses: the batch, ``len(prompts) == len(responses)``.
            columns: dataset column name -> one value per sample. Only the columns the function
                takes are passed.
            where: optional label per sample for messages (default ``"sample i of the batch"``).

        Raises :class:`RewardError` naming the function and the sample when the function raises,
        returns a non-number, NaN or an infinity, or (batched) returns other than ``len(prompts)``
        values, or when the batch lacks a column the function requires.
        """
        return _run_sync(self.acall(prompts, responses, columns, where))

    async def acall(self, prompts: Sequence[str], responses: Sequence[str],
                    columns: Mapping[str, Sequence[Any]] | None = None,
                    where: Sequence[str] | None = None) -> list[float]:
        """:meth:`__call__` for callers already inside an event loop."""
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        passed = self._passed_columns(columns or {}, n)
        labels = list(where) if where is not None else [f"sample {i} of the batch" for i in range(n)]
        if n == 0:
            return []
        if self.kind == "batch":
            return await self._score_batch(list(prompts), list(responses), passed, labels)
        return await self._score_samples(prompts, responses, passed, labels)

    # -- internals ----------------------------------------------------------------------------

    def _passed_columns(self, columns: Mapping[str, Sequence[Any]], n: int) -> dict[str, list[Any]]:
        missing = [name for name in self.required if name not in columns]
        if missing:
            listed = ", ".join(repr(c) for c in columns) or "none"
            raise RewardError(f"reward function {self.spec!r} requires column(s) {', '.join(map(repr, missing))} "
                              f"but the batch carries {listed}; add the column to the prompt file", self.spec)
        passed: dict[str, list[Any]] = {}
        for name, values in columns.items():
            if name in self.leading or (self.wanted is not None and name not in self.wanted):
                continue
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for a batch of {n}")
            passed[name] = list(values)
        return passed

    def _error(self, message: str, index: int | None) -> RewardError:
        return RewardError(message, self.spec, batch_index=index)

    def _bad_value(self, raw: Any, label: str, response: str, index: int) -> RewardError:
        return self._error(f"reward function {self.spec!r} returned {_short_repr(raw)} ({type(raw).__name__}) "
                           f"on {label} (response {_excerpt(response)}); it must return a finite float", index)

    def _raised(self, exc: BaseException, label: str, response: str, index: int) -> RewardError:
        hint = ("; it is declared kind: sample, so it gets one prompt and one response"
                if isinstance(exc, TypeError) else "")
        return self._error(f"reward function {self.spec!r} raised {type(exc).__name__}: {exc} on {label} "
                           f"(response {_excerpt(response)}); fix the function{hint}", index)

    async def _score_samples(self, prompts, responses, passed, labels) -> list[float]:
        n = len(prompts)
        kwargs = [{name: values[i] for name, values in passed.items()} for i in range(n)]
        if self.is_async:
            semaphore = asyncio.Semaphore(self.max_concurrency)

            async def one(i: int) -> Any:
                async with semaphore:
                    return await self.fn(prompts[i], responses[i], **kwargs[i])

            results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        else:
            results = []
            for i in range(n):
                try:
                    raw = self.fn(prompts[i], responses[i], **kwargs[i])
                    if inspect.isawaitable(raw):  # a plain function that hands back a coroutine
                        raw = await raw
                except Exception as exc:
                    raise self._raised(exc, labels[i], responses[i], i) from exc
                results.append(raw)
        out: list[float] = []
        for i, raw in enumerate(results):
            if isinstance(raw, Exception):
                raise self._raised(raw, labels[i], responses[i], i) from raw
            if isinstance(raw, BaseException):  # CancelledError, KeyboardInterrupt: not the function's bug
                raise raw
            value = _as_finite_float(raw)
            if value is None:
                raise self._bad_value(raw, labels[i], responses[i], i)
            out.append(value)
        return out

    async def _score_batch(self, prompts, responses, passed, labels) -> list[float]:
        n = len(prompts)
        try:
            raw = self.fn(prompts, responses, **passed)
            if inspect.isawaitable(raw):
                raw = await raw
        except Exception as exc:
            raise self._error(f"reward function {self.spec!r} raised {type(exc).__name__}: {exc} on a batch of "
                              f"{n} samples; fix the function", None) from exc
        if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__len__") or not hasattr(raw, "__iter__"):
            raise self._error(f"reward function {self.spec!r} returned {_short_repr(raw)} "
                              f"({type(raw).__name__}) for a batch of {n} samples; a kind: batch function must "
                              f"return a list of {n} floats (declare kind: sample if it scores one sample)", None)
        values = list(raw)
        if len(values) != n:
            raise self._error(f"reward function {self.spec!r} returned {len(values)} values for a batch of {n} "
                              f"samples; it must return exactly one float per sample", None)
        out: list[float] = []
        for i, item in enumerate(values):
            value = _as_finite_float(item)
            if value is None:
                raise self._bad_value(item, labels[i], responses[i], i)
            out.append(value)
        return out
