"""The quiet console's worker hook (:mod:`ray_rlhf.console`), run in a child process: routine
output goes to the run's log file, what a user must see still reaches the console stream."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def _run_hook(tmp_path, body: str) -> tuple[str, str]:
    code = textwrap.dedent("""
        import logging, os, sys
        from ray_rlhf.console import setup_worker
        setup_worker()
    """) + textwrap.dedent(body)
    env = {**os.environ, "RAY_RLHF_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("worker-*.log"))
    return proc.stdout + proc.stderr, logs


def test_routine_output_goes_to_the_log_file_and_important_records_to_the_console(tmp_path):
    console, logs = _run_hook(tmp_path, """
        print("engine started, weights loaded")
        os.write(2, b"RotaryEmbedding: Failed to load weights\\n")  # C++/fd-level output too
        logging.getLogger("vllm.model_executor").warning("routine engine warning")
        logging.getLogger("ray_rlhf.generation").warning("reward column missing in 3 rows")
        logging.getLogger("some.library").error("a real error")
        logging.getLogger("ray_rlhf.learning").info("routine progress")
        sys.stdout.flush(); sys.stderr.flush()
    """)
    for routine in ("engine started", "Failed to load weights", "routine engine warning", "routine progress"):
        assert routine not in console
        assert routine in logs
    assert "WARNING ray_rlhf.generation: reward column missing in 3 rows" in console
    assert "ERROR some.library: a real error" in console


def test_without_a_log_dir_nothing_changes(tmp_path):
    code = "from ray_rlhf.console import setup_worker; setup_worker(); print('visible')"
    env = {k: v for k, v in os.environ.items() if k != "RAY_RLHF_LOG_DIR"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout == "visible\n"
