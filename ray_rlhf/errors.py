"""Errors a user can act on.

A :class:`UserError` is a mistake in the user's input (config, paths, data, reward code). The CLI
prints its message as one line and exits with status 2, without a traceback. The message names
the offending thing and the fix, e.g. ``unknown config key 'ppo.bogus' (valid keys: ...)``.
Everything else is a bug or an infrastructure failure and keeps its traceback.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A user mistake, reported as one line naming the problem and the fix."""

    def __init__(self, message: str):
        # One line, always: collapse whatever the caller formatted.
        super().__init__(" ".join(str(message).split()))


def user_error_of(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``exc``, also when it was raised inside a Ray actor, or None.

    Ray re-raises a remote exception as a ``RayTaskError`` (a subclass of both RayTaskError and the
    remote class, whose ``str`` is the whole remote traceback) with the original in ``.cause``; an
    actor whose constructor raised surfaces as ``ActorDiedError`` carrying only that text. Either
    way we want the original one-line message.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        ray_exc = sys.modules.get("ray.exceptions")
        if ray_exc is not None and isinstance(exc, ray_exc.RayTaskError):
            exc = exc.cause
            continue
        if isinstance(exc, UserError):
            return exc
        if ray_exc is not None and isinstance(exc, ray_exc.RayActorError):
            return _user_error_in_text(str(getattr(exc, "error_msg", "") or exc))
        exc = exc.__cause__
    return None


def _user_error_in_text(text: str) -> UserError | None:
    """The last ``module.SomeUserError: message`` line of a remote traceback, as a UserError."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in _subclasses(UserError)}
    for line in reversed(text.splitlines()):
        name, sep, message = line.strip().partition(": ")
        if sep and name in names:
            return UserError(message)
    return None


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out
