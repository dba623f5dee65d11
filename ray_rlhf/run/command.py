"""Running a command of the ``ray-rlhf`` CLI (or a ``python -m`` form): how it ends.

A user mistake (:class:`~ray_rlhf.errors.UserError`) prints one line and exits with status 2; a
weight sync that failed its verification (:class:`~ray_rlhf.sync.types.WeightSyncError`: a generator
does not compute with the learner's weights or adapter) prints one line and exits with status
:data:`EXIT_SYNC_FAILED` -- the run's last complete checkpoint is untouched; a preempted run prints
how to resume and exits with :data:`~ray_rlhf.run.preemption.EXIT_PREEMPTED`.
"""

from __future__ import annotations

import sys

from ray_rlhf.errors import user_error_of
from ray_rlhf.run.preemption import EXIT_PREEMPTED, Preempted, exit_on_next_signal
from ray_rlhf.sync.types import WeightSyncError

EXIT_SYNC_FAILED = 3
"""Exit status of a run stopped by a failed weight-sync verification."""


def sync_error_of(exc: BaseException) -> WeightSyncError | None:
    """``exc`` if it is a :class:`WeightSyncError`, or the one a Ray error carries (``cause``), or
    one in its ``__cause__`` chain; else None."""
    found, seen = None, 0
    while exc is not None and seen < 8:  # the innermost one: a Ray error's own text holds a traceback
        if isinstance(exc, WeightSyncError):
            found = exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return found


def _stop_ray() -> None:
    """Shut Ray down (if this process started or joined it) so its log lines come before ours."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 -- best effort on the way out
        pass
    sys.stdout.flush()


def run_command(func, args) -> int:
    """Run a command; user mistakes become one line on stderr and exit status 2.

    A user mistake found inside a Ray actor (a reward function that raises, ...) comes back as a
    Ray error; it is unwrapped to its one line. Ray is shut down before the line is printed, so the
    error is the last thing on stderr rather than buried under actors' log output.
    """
    try:
        func(args)
    except Preempted as p:
        exit_on_next_signal()
        _stop_ray()
        exit_on_next_signal()  # again: Ray's shutdown puts SIGTERM back to the default action
        print(f"ray-rlhf: preempted by {p.signame} after step {p.step}; checkpoint {p.checkpoint} is complete. "
              "Run the same command again to resume.", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        _stop_ray()
        print("ray-rlhf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        user = user_error_of(e)
        if user is None:
            failed = sync_error_of(e)
            if failed is None:
                raise
            _stop_ray()
            message = " ".join(str(failed).split())
            print(f"ray-rlhf: weight sync failed verification: {message}", file=sys.stderr)
            return EXIT_SYNC_FAILED
        _stop_ray()
        print(f"ray-rlhf: error: {user}", file=sys.stderr)
        return 2
    return 0


