"""Metrics JSONL / TensorBoard / progress bar, resume truncation, rollout Parquet, rollout_stats."""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from ray_rlhf.metrics import MetricsLogger, RolloutLogger, read_rollouts, rollout_file, rollout_stats
from ray_rlhf.records import ROLLOUT_SCHEMA, RolloutBatch, RolloutSummary
from tests.batches import make_batch


def rollout(p, s, reward, n_tokens, finish="stop", version=3, parts=None, response="r"):
    return dict(prompt_index=p, sample_index=s, prompt=f"prompt {p}", response=response, prompt_ids=[1, 2],
                response_ids=list(range(n_tokens)), sampler_logprobs=[-1.0] * n_tokens, finish_reason=finish,
                policy_version=version, generator_id=f"g{s}", reward=reward, reward_parts=parts or {})


def batch(*rows) -> RolloutBatch:
    return make_batch(list(rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def quiet(run_dir, **kw):
    return MetricsLogger(run_dir, tensorboard=kw.pop("tensorboard", False), progress_bar=False, **kw)


# ------------------------------------------------------------------------------ metrics.jsonl


def test_jsonl_one_plain_line_per_step_flushed(tmp_path):
    m = quiet(tmp_path)
    m.log(1, {"reward/mean": 0.5, "pool/size": 2, "sync/verified": True, "ppo/kl_ref": torch.tensor(0.25)})
    # Readable before close: flushed every step.
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "reward/mean": 0.5, "pool/size": 2, "sync/verified": 1, "ppo/kl_ref": 0.25}]
    m.log(2, {"reward/mean": float("nan"), "x": float("inf"), "y": -float("inf"), "z": None, "step": 99})
    m.close()
    m.close()  # idempotent
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[1] == {"step": 2, "reward/mean": None, "x": None, "y": None, "z": None}
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert type(rows[0]["ppo/kl_ref"]) is float and type(rows[0]["pool/size"]) is int


def test_non_numeric_metric_is_an_error(tmp_path):
    with quiet(tmp_path) as m, pytest.raises(TypeError, match="metric 'name' must be a number, got str"):
        m.log(1, {"name": "abc"})


def test_resume_truncates_later_steps(tmp_path):
    with quiet(tmp_path) as m:
        for step in range(1, 6):
            m.log(step, {"v": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "v": 6.')  # torn line: the process died mid-write
    with quiet(tmp_path, resume_from_step=3, start_step=3) as m:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        m.log(4, {"v": 40.0})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["v"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_fresh_run_starts_empty(tmp_path):
    with quiet(tmp_path) as m:
        m.log(1, {"v": 1.0})
    with quiet(tmp_path, resume_from_step=None) as m:
        m.log(1, {"v": 2.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "v": 2.0}]


def test_resume_without_previous_file(tmp_path):
    with quiet(tmp_path / "new", resume_from_step=7) as m:
        m.log(8, {"v": 1.0})
    assert read_jsonl(tmp_path / "new" / "metrics.jsonl") == [{"step": 8, "v": 1.0}]


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with quiet(tmp_path, tensorboard=True) as m:
        m.log(1, {"reward/mean": 0.5, "ppo/kl_ref": float("nan")})
        m.log(2, {"reward/mean": 0.75, "ppo/kl_ref": 0.1})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    kl = acc.Scalars("ppo/kl_ref")
    assert math.isnan(kl[0].value) and kl[1].value == pytest.approx(0.1)


def test_progress_bar_postfix(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=4, start_step=1, tensorboard=False) as m:
        m.log(2, {"reward/mean": 0.123456, "ppo/kl_ref": 0.01, "time/step": 2.5})
        m._bar.refresh()
    err = capsys.readouterr().err
    assert "2/4" in err and "reward=0.123" in err and "kl=0.01" in err and "s/step=2.5" in err


# ---------------------------------------------------------------------------- rollout Parquet


def test_rollout_parquet_round_trip_and_resume(tmp_path):
    step1 = batch(rollout(0, 0, 0.5, 3), rollout(0, 1, -1.0, 4, finish="length", response="né\nwith unicode"))
    step2 = batch(rollout(1, 0, 2.0, 1))
    with RolloutLogger(tmp_path) as log:
        path = log.write(1, step1)
        log.write(2, step2)
        log.write(3, step2)
    assert path == tmp_path / "rollouts" / "step_000001.parquet"
    assert pq.read_schema(path).remove_metadata() == ROLLOUT_SCHEMA
    table = read_rollouts(tmp_path)
    assert table.schema == ROLLOUT_SCHEMA
    rows = table.to_pylist()
    assert [(r["step"], r["prompt_index"], r["sample_index"]) for r in rows] == [(1, 0, 0), (1, 0, 1), (2, 1, 0),
                                                                                 (3, 1, 0)]
    assert rows[1] == {"step": 1, "prompt_index": 0, "sample_index": 1, "policy_version": 3, "generator_id": "g1",
                       "prompt": "prompt 0", "response": "né\nwith unicode", "response_tokens": 4,
                       "finish_reason": "length", "reward": -1.0, "prompt_ids": [1, 2],
                       "response_ids": [0, 1, 2, 3], "sampler_logprobs": [-1.0] * 4}
    # Resume after step 1: later files go, and rewriting a step replaces its file.
    with RolloutLogger(tmp_path, resume_from_step=1) as log:
        assert not rollout_file(tmp_path, 2).exists() and not rollout_file(tmp_path, 3).exists()
        log.write(2, batch(rollout(7, 0, 9.0, 2)))
        log.write(2, batch(rollout(8, 0, 9.0, 2)))
    assert [(r["step"], r["prompt_index"]) for r in read_rollouts(tmp_path).to_pylist()] == [(1, 0), (1, 0), (2, 8)]
    assert not list((tmp_path / "rollouts").glob("*.tmp"))


def test_read_rollouts_empty(tmp_path):
    assert read_rollouts(tmp_path).num_rows == 0


# ------------------------------------------------------------------------------ rollout_stats


def test_rollout_stats_hand_computed():
    rs = RolloutSummary.of(batch(
        rollout(0, 0, 1.0, 2, "stop", version=4, parts={"f": 0.5, "model": 1.0}),
        rollout(0, 1, 3.0, 6, "length", version=3, parts={"f": 1.5, "model": -1.0}),
        rollout(1, 0, -1.0, 4, "stop", version=4, parts={"f": 1.0, "model": 0.0}),
        rollout(1, 1, 1.0, 8, "stop", version=2, parts={"f": 0.0, "model": 2.0}),
    ))
    s = rollout_stats(rs, learner_version=4)
    # rewards 1, 3, -1, 1: mean 1; deviations 0, 2, -2, 0 -> variance (0+4+4+0)/4 = 2 -> std sqrt(2)
    # lengths 2, 6, 4, 8: mean 5, max 8; finished 3 of 4; lags 0, 1, 0, 2: mean 0.75, max 2
    # part means: f (0.5+1.5+1+0)/4 = 0.75; model (1-1+0+2)/4 = 0.5
    assert s == {
        "rollout/count": 4,
        "reward/mean": 1.0,
        "reward/std": pytest.approx(math.sqrt(2)),
        "reward/min": -1.0,
        "reward/max": 3.0,
        "response/length_mean": 5.0,
        "response/length_max": 8,
        "response/finished_frac": 0.75,
        "rollout/truncated_frac": 0.25,
        "reward_part/f": 0.75,
        "reward_part/model": 0.5,
        "rollout/version_lag_mean": 0.75,
        "rollout/version_lag_max": 2,
    }
    assert "rollout/version_lag_mean" not in rollout_stats(rs)


def test_rollout_stats_rejects_unscored_or_empty():
    with pytest.raises(ValueError, match="at least one"):
        RolloutSummary.of(batch(rollout(0, 0, 1.0, 1)).select([]))
    with pytest.raises(ValueError, match="scored"):
        RolloutSummary.of(batch(rollout(0, 0, None, 1)))
