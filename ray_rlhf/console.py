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
    to_file = logging.StreamHandler(sys.stderr)  # now the log file: every record, routine ones too
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(to_file)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))


# ---------------------------------------------------------------- the driver's side

ROUTINE_RAY_NOTICES = ("Token authentication is enabled for this Ray cluster",)
"""Ray's routine notices on a local start: kept out of the console, written to ``logs/driver.log``
(the warning that token authentication is *disabled* is not routine and still shows)."""


class _BarSafeHandler(logging.StreamHandler):
    """Log lines printed above the progress bar (``tqdm.write``), never glued to its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 -- logging must not raise
            self.handleError(record)


class _RoutineToFile(logging.Filter):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.getMessage().startswith(ROUTINE_RAY_NOTICES):
            return True
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a") as f:
                f.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")
        except OSError:
            return True  # nowhere to put it: show it rather than lose it
        return False


def setup_driver_logging() -> None:
    """The driver's console: INFO and above of every logger, printed above the progress bar."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[_BarSafeHandler(sys.stderr)])


def quiet_ray_notices(log_dir: str) -> None:
    """Before ``ray.init`` of a local Ray: Ray's routine notices go to ``<log_dir>/driver.log``."""
    flt = _RoutineToFile(os.path.join(log_dir, "driver.log"))
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _RoutineToFile) for f in handler.filters):
            handler.addFilter(flt)
