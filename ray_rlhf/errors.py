"""Errors a user can act on.

A :class:`UserError` is a mistake in the user's input (config, paths, data, reward code). The CLI
prints its message as one line and exits with status 2, without a traceback. The message names
the offending thing and the fix, e.g. ``unknown config key 'ppo.bogus' (valid keys: ...)``.
Everything else is a bug or an infrastructure failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user mistake, reported as one line naming the problem and the fix."""

    def __init__(self, message: str):
        # One line, always: collapse whatever the caller formatted.
        super().__init__(" ".join(str(message).split()))
