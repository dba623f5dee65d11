"""SIGTERM / SIGINT to the driver: finish the step, write a checkpoint, leave cleanly.

A spot instance's notice (SIGTERM) or a Ctrl-C (SIGINT) asks the driver to stop: the current step
completes, a complete checkpoint is written (atomically, as every checkpoint), the actors are shut
down and the command exits with :data:`EXIT_PREEMPTED` and one line saying how to resume. A
second signal exits at once: whatever checkpoint was being written stays a temporary directory
that resume never picks. The exit status is :data:`EXIT_PREEMPTED` except for a second signal
that lands while Ray itself shuts down (about a second, after the checkpoint): Ray's shutdown resets
SIGTERM to the default action, so that one ends the process at once by the signal (status 143).

Python runs a signal's handler when the main thread next runs Python code; a driver waiting on
Ray gets there about once a second (Ray checks for signals at that interval). Two signals that
arrive before that are one call to the handler, so they count as one: the second is sent after
the warning the first one prints.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit status of a preempted run (EX_TEMPFAIL: try again -- the same command resumes)."""


class Preempted(Exception):
    """The run stopped on a signal after writing the checkpoint of ``step``."""

    def __init__(self, signame: str, step: int, checkpoint: str):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {checkpoint}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class StopSignals:
    """``with StopSignals() as stop: ... if stop.requested: ...`` (handlers only in the main thread)."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self._exit_now(signum, frame)
        self.requested = name
        log.warning("%s received: finishing this step, writing a checkpoint, then stopping "
                    "(send it again to exit at once)", name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @staticmethod
    def _exit_now(signum, frame) -> None:
        print(f"ray-rlhf: second {signal.Signals(signum).name}: exiting now (the last complete checkpoint stays "
              "valid)", file=sys.stderr, flush=True)
        os._exit(EXIT_PREEMPTED)


def exit_on_next_signal() -> None:
    """A preempted command on its way out (Ray stopping): a further SIGTERM/SIGINT exits at once
    with :data:`EXIT_PREEMPTED`, rather than reaching Ray's handler, which raises ``SystemExit``
    wherever the process happens to be. Main thread of a process that is about to exit only."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, StopSignals._exit_now)
