"""The driver's stop signals: one finishes the step, a second exits at once, also after Ray has
shut down (Ray's shutdown resets SIGTERM to the default action, which would kill the process with
status 143 instead of :data:`EXIT_PREEMPTED`)."""

from __future__ import annotations

import signal

import pytest

from ray_rlhf.run import command, preemption
from ray_rlhf.run.preemption import EXIT_PREEMPTED, Preempted, StopSignals


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_first_signal_is_a_request_and_the_handlers_come_back_on_exit(restore_handlers):
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.requested is None
        stop._handle(signal.SIGTERM, None)
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_signal_exits_at_once_with_the_preempted_status(restore_handlers, monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)
    with StopSignals() as stop:
        stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGINT, None)
    assert exits == [EXIT_PREEMPTED]


def test_the_exit_at_once_handler_is_armed_again_after_ray_shut_down(restore_handlers, monkeypatch, capsys):
    def ray_shutdown_resets_sigterm():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.shutdown() does to the driver (measured)

    def preempted(_args):
        raise Preempted("SIGTERM", 3, "/run/checkpoints/step_000003")

    monkeypatch.setattr(command, "_stop_ray", ray_shutdown_resets_sigterm)
    assert command.run_command(preempted, None) == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGTERM) is StopSignals._exit_now
    assert signal.getsignal(signal.SIGINT) is StopSignals._exit_now
    assert "preempted by SIGTERM after step 3" in capsys.readouterr().err
