"""A quiet console: the actors' routine output goes to log files in the run directory.

vLLM, torch and Ray print a lot inside the actors (engine start-up, weight-loading progress,
``RotaryEmbedding: Failed to load weights`` on every weight reload, NUMA binding notices...), and
Ray forwards every line of it to the driver's console, between the progress bar's lines. A local
run installs :func:`setup_worker` as Ray's ``worker_process_setup_hook``: every worker process of
the run sends its stdout and stderr (file descriptors 1 and 2, so C++ output too) to
``<output_dir>/logs/worker-<pid>.log``, and only what the user may need to act on still reaches
the console: records of the ``ray_rlhf`` loggers at WARNING and above, and ERRORs of any logger.
Exceptions raised in actors travel to the driver as Ray errors, as before.

Set ``RAY_RLHF_VERBOSE=1`` (or ``logging.quiet_actors=false``) to see everything on the console.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_DIR_ENV = "RAY_RLHF_LOG_DIR"
"""Environment variable naming the directory of the workers' log files (set by the driver)."""


class _Important(logging.Filter):
    """What still reaches the console from an actor."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and record.name.startswith("ray_rlhf"))


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: this worker's output to its log file, the important
    records to the console (a no-op without :data:`LOG_DIR_ENV` or when the directory is not
    writable from this node)."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return
    try:
        os.makedirs(log_dir, exist_ok=True)
        fd = os.open(os.path.join(log_dir, f"worker-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return  # e.g. a cluster node without the driver's directory: keep Ray's own logging
    console = os.fdopen(os.dup(2), "w", buffering=1)  # the stream Ray forwards to the driver
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(console)
    handler.addFilter(_Important())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
