"""Operations on a real local Ray with real vLLM (CPU): chaos, preemption, learner recovery.

One undisturbed reference run (16 short steps, checkpoints every 4) and, against it:

* chaos: generator 0 killed mid-rollout at step 3, a generator that stops answering at step 6
  (its shard runs past ``generators.shard_timeout_s`` and is re-queued), the reward actor killed
  at step 9, learner rank 0 killed during step 11's update (the run restores the checkpoint of
  step 8 into a new learner group and replays steps 9-11). The run finishes on its own; every step
  holds exactly one result per (prompt, sample); final weights and metrics equal the reference.
* SIGTERM during a checkpoint save: the save completes, the run stops with ``Preempted``; running
  it again resumes and ends equal to the reference.
* SIGTERM to a ``python -m ray_rlhf.train`` process during a step: exit status 75, one line on how
  to resume, a complete checkpoint; a second signal exits at once with no torn checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray

from ray_rlhf import checkpoint
from ray_rlhf.config import load_config
from ray_rlhf.data.prompts import PromptStream, bundled_prompts_path, load_prompts
from ray_rlhf.metrics import read_rollouts
from ray_rlhf.run.driver import run
from ray_rlhf.run.preemption import EXIT_PREEMPTED, Preempted
from ray_rlhf.sync.checksum import state_dict_checksum

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STEPS, PROMPTS, SAMPLES = 16, 8, 2
BASE = [f"steps={STEPS}", f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
        "rollout.max_new_tokens=12", "generators.shard_prompts=2", "ppo.minibatch_size=16", "ppo.micro_batch_size=16",
        "checkpoint.every=4", "checkpoint.keep=4", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.ray_metrics=false", "ray.num_cpus=2", "generators.shard_timeout_s=15"]
COMPARED = ("reward/mean", "reward/std", "response/length_mean", "ppo/policy_loss", "ppo/value_loss", "ppo/kl_ref",
            "ppo/grad_norm", "ppo/entropy", "ppo/approx_kl", "policy_version")


def cfg(out: Path, cache: Path, *extra):
    return load_config("tiny", [*BASE, f"output_dir={out}", f"model.cache_dir={cache}", *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> str:
    from ray_rlhf.models.output_head import read_hf_state

    return state_dict_checksum(read_hf_state(out / "checkpoints" / f"step_{STEPS:06d}" / "policy"))


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb):
        for key in COMPARED:
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
    assert final_weights(a) == final_weights(b)


def check_batches(out: Path) -> None:
    rows = read_rollouts(out).to_pylist()
    stream = PromptStream(load_prompts(bundled_prompts_path()), seed=0)
    for step in range(1, STEPS + 1):
        want = Counter((p.index, s) for p in stream.next_batch(PROMPTS) for s in range(SAMPLES))
        got = Counter((r["prompt_index"], r["sample_index"]) for r in rows if r["step"] == step)
        assert got == want, f"step {step}: lost or duplicated samples"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_policy_path):
    out = tmp_path_factory.mktemp("reference")
    try:
        run(cfg(out, tiny_policy_path.parent))
    finally:
        ray.shutdown()
    return out


def test_chaos_run_finishes_and_equals_the_undisturbed_run(reference, tmp_path, tiny_policy_path):
    faults = ["faults.kill_generator=[{step: 3, index: 0}]", "faults.hang_generator=[{step: 6, index: 1}]",
              "faults.kill_reward=[{step: 9}]", "faults.kill_learner=[{step: 11}]"]
    try:
        out = run(cfg(tmp_path, tiny_policy_path.parent, *faults))
    finally:
        ray.shutdown()
    rows = {r["step"]: r for r in metrics(out)}
    assert rows[3]["pool/deaths"] == 1 and rows[3]["pool/requeued_shards"] >= 1
    assert rows[6]["pool/deaths"] == 1 and rows[6]["pool/requeued_shards"] >= 1  # the hung one, replaced
    assert all(r["sync/verified"] == 1.0 for r in rows.values())
    check_batches(out)
    assert_same_run(reference, out)


def test_sigterm_during_a_checkpoint_save_then_resume_equals_the_undisturbed_run(reference, tmp_path, tiny_policy_path,
                                                                               monkeypatch):
    from ray_rlhf.run import state

    save = state.save

    def save_with_a_signal(cfg_, actors, cursor, step, pending=()):
        if step == 4:  # the signal lands in the middle of writing the checkpoint
            original = actors.learners.save_part

            def learner_save(uri, staging):
                os.kill(os.getpid(), signal.SIGTERM)
                return original(uri, staging)

            actors.learners.save_part = learner_save
        return save(cfg_, actors, cursor, step, pending)

    monkeypatch.setattr(state, "save", save_with_a_signal)
    try:
        with pytest.raises(Preempted) as stopped:
            run(cfg(tmp_path, tiny_policy_path.parent))
    finally:
        ray.shutdown()
    assert stopped.value.step == 4 and stopped.value.signame == "SIGTERM"
    latest = checkpoint.open_store(tmp_path).latest()
    assert latest.step == 4
    checkpoint.validate(Path(latest.path))
    monkeypatch.setattr(state, "save", save)
    try:
        run(cfg(tmp_path, tiny_policy_path.parent))  # the same command again: resumes at step 4
    finally:
        ray.shutdown()
    assert_same_run(reference, tmp_path)


def _train(out: Path, cache: Path, *extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "ray_rlhf.train", "--config", "tiny", *BASE, f"output_dir={out}",
           f"model.cache_dir={cache}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never logged (exit {proc.poll()})")


def test_sigterm_to_the_command_checkpoints_and_exits_75_and_a_second_one_exits_at_once(tmp_path, tiny_policy_path):
    out = tmp_path / "run"
    proc = _train(out, tiny_policy_path.parent)
    _wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGTERM)  # during step 2 (or right after step 1)
    _, err = proc.communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert lines[-1].startswith("ray-rlhf: preempted by SIGTERM after step ") and "Run the same command" in lines[-1]
    assert "Traceback" not in err
    found = checkpoint.open_store(out).latest()
    assert found is not None and int(checkpoint.validate(Path(found.path))["step"]) == len(metrics(out))

    # The second signal, as a user sends it: after the run has said it got the first. Step 3 hangs
    # (generator 0 stops answering; its shard waits out the 15 s deadline), so both land inside the
    # step, where the run's own handler is installed. (Two signals that arrive before Python has run
    # the handler of the first are one call to it: Python coalesces them.)
    second = tmp_path / "second"
    proc = _train(second, tiny_policy_path.parent, "checkpoint.every=1", "faults.hang_generator=[{step: 3, index: 0}]")
    err_lines = _drain(proc.stderr)
    _drain(proc.stdout)
    deadline = time.monotonic() + 300
    while (found := checkpoint.open_store(second).latest()) is None or found.step < 2:
        assert time.monotonic() < deadline and proc.poll() is None, f"no checkpoint of step 2 (exit {proc.poll()})"
        time.sleep(0.2)
    time.sleep(1.0)  # into step 3
    proc.send_signal(signal.SIGTERM)
    while not any("SIGTERM received: finishing this step" in ln for ln in err_lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(err_lines)[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    proc.wait(timeout=120)
    waited = time.monotonic() - t0
    last = time.monotonic() + 10  # the reader gets the line printed just before the exit
    while not any("second SIGTERM" in ln for ln in err_lines) and time.monotonic() < last:
        time.sleep(0.1)
    err = "".join(err_lines)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "ray-rlhf: second SIGTERM: exiting now" in err and waited < 10, (waited, err[-3000:])  # not after step 3
    found = checkpoint.open_store(second).latest()  # never a torn one: step 2's, complete
    assert found is not None and found.step == 2
    checkpoint.validate(Path(found.path))


def _drain(pipe) -> list[str]:
    """The lines of ``pipe`` as a reader thread gets them (so the child never blocks on a full pipe)."""
    lines: list[str] = []

    def read() -> None:
        for line in iter(pipe.readline, ""):
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines
