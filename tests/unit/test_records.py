"""The columnar RolloutBatch: construction, concat, select, padding (vs a slow loop), Parquet rows, the
truncated flag (finish reason "length") from the samplers to the learner's tensors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from ray_rlhf.learning.batch import collate
from ray_rlhf.records import ROLLOUT_SCHEMA, PromptItem, RolloutBatch, SamplingSpec, pad_ragged, ragged_rows
from tests.batches import make_batch


def random_batch(rng: np.random.Generator, n: int, start: int = 0) -> RolloutBatch:
    rows = []
    for i in range(n):
        p, r = int(rng.integers(1, 7)), int(rng.integers(0, 9))
        rows.append(dict(prompt_index=start + i // 2, sample_index=i % 2, prompt_ids=rng.integers(3, 99, p).tolist(),
                         response_ids=rng.integers(3, 99, r).tolist(), sampler_logprobs=(-rng.random(r)).tolist(),
                         reward=float(rng.normal()), policy_version=int(rng.integers(0, 3)),
                         response="x" * r, finish_reason="stop" if r % 2 else "length",
                         columns={"answer": f"a{start + i}"}))
    return make_batch(rows)


def slow_pad(seqs: list[list], pad, left: bool) -> tuple[list[list], list[list]]:
    """The obvious per-row loop that :func:`pad_ragged` replaces."""
    w = max(max((len(s) for s in seqs), default=0), 1)
    dense, mask = [], []
    for s in seqs:
        fill = [pad] * (w - len(s))
        dense.append(fill + list(s) if left else list(s) + fill)
        mask.append([0] * len(fill) + [1] * len(s) if left else [1] * len(s) + [0] * len(fill))
    return dense, mask


def rows_of(values: np.ndarray, offsets: np.ndarray) -> list[list]:
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@pytest.mark.parametrize("left", [False, True])
def test_pad_ragged_matches_a_python_loop_on_random_rows(left):
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = random_batch(rng, int(rng.integers(1, 9)))
        dense, mask = pad_ragged(b.response_ids, b.response_offsets, -7, left=left)
        want_dense, want_mask = slow_pad(rows_of(b.response_ids, b.response_offsets), -7, left)
        assert dense.tolist() == want_dense and mask.tolist() == want_mask


def test_pad_ragged_by_hand():
    # rows [1, 2], [], [3]: right -> [[1, 2], [0, 0], [3, 0]]; left -> [[1, 2], [0, 0], [0, 3]]
    values, offsets = np.array([1, 2, 3]), np.array([0, 2, 2, 3])
    assert pad_ragged(values, offsets, 0)[0].tolist() == [[1, 2], [0, 0], [3, 0]]
    assert pad_ragged(values, offsets, 0, left=True)[0].tolist() == [[1, 2], [0, 0], [0, 3]]
    assert pad_ragged(values, offsets, 0, left=True)[1].tolist() == [[1, 1], [0, 0], [0, 1]]


def test_concat_then_select_equals_the_rows_picked_one_by_one():
    rng = np.random.default_rng(1)
    parts = [random_batch(rng, 3, 0), random_batch(rng, 5, 10), random_batch(rng, 1, 20)]
    whole = RolloutBatch.concat(parts)
    assert len(whole) == 9 and whole.keys() == [k for p in parts for k in p.keys()]
    assert rows_of(whole.response_ids, whole.response_offsets) == [
        r for p in parts for r in rows_of(p.response_ids, p.response_offsets)]
    assert whole.columns["answer"] == [v for p in parts for v in p.columns["answer"]]
    pick = [8, 0, 4, 4]
    sub = whole.select(pick)
    assert sub.keys() == [whole.keys()[i] for i in pick]
    assert rows_of(sub.prompt_ids, sub.prompt_offsets) == [rows_of(whole.prompt_ids, whole.prompt_offsets)[i] for i in pick]
    assert rows_of(sub.sampler_logprobs, sub.response_offsets) == [
        rows_of(whole.sampler_logprobs, whole.response_offsets)[i] for i in pick]
    assert sub.reward.tolist() == whole.reward[pick].tolist() and sub.columns["answer"] == [
        whole.columns["answer"][i] for i in pick]


def test_ragged_rows_gather_indices():
    # offsets of rows [a, b], [c], [d, e, f]; rows 2, 0 -> indices 3, 4, 5, 0, 1; offsets 0, 3, 5
    idx, off = ragged_rows(np.array([0, 2, 3, 6]), np.array([2, 0]))
    assert idx.tolist() == [3, 4, 5, 0, 1] and off.tolist() == [0, 3, 5]


def test_collate_equals_padding_each_sequence_by_hand():
    rng = np.random.default_rng(2)
    b = random_batch(rng, 7)
    t = collate(b, pad_id=2)
    prompts, pmask = slow_pad(rows_of(b.prompt_ids, b.prompt_offsets), 2, left=True)
    responses, rmask = slow_pad(rows_of(b.response_ids, b.response_offsets), 2, left=False)
    lps, _ = slow_pad(rows_of(b.sampler_logprobs, b.response_offsets), 0.0, left=False)
    assert t.prompt_ids.tolist() == prompts and t.prompt_mask.tolist() == pmask
    assert t.response_ids.tolist() == responses and t.response_mask.tolist() == rmask
    assert np.allclose(t.sampler_logprobs.numpy(), np.array(lps, dtype=np.float32))
    assert t.scores.tolist() == pytest.approx(b.reward.tolist()) and t.prompt_index.tolist() == b.prompt_index.tolist()
    assert t.truncated.tolist() == (b.finish_reason == "length").tolist()


def test_to_arrow_holds_the_fixed_schema_then_parts_and_columns():
    rng = np.random.default_rng(3)
    b = random_batch(rng, 4).with_rewards(np.arange(4.0), {"f": np.ones(4)})
    table = b.to_arrow(step=7)
    assert table.schema.names[: len(ROLLOUT_SCHEMA)] == ROLLOUT_SCHEMA.names
    assert table.select(ROLLOUT_SCHEMA.names).cast(ROLLOUT_SCHEMA).schema == ROLLOUT_SCHEMA
    assert table.schema.names[len(ROLLOUT_SCHEMA):] == ["reward_part/f", "answer"]
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == [7] * 4 and [r["reward"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    assert [r["response_ids"] for r in rows] == rows_of(b.response_ids, b.response_offsets)
    assert isinstance(table.column("prompt_ids").type, pa.ListType)


def test_sampling_for_step_is_one_seed_per_run_seed_and_step():
    class Rollout:
        samples_per_prompt, max_new_tokens, temperature, top_p, ignore_eos = 4, 16, 1.0, 1.0, False

    a, b = SamplingSpec.for_step(Rollout, 0, 1), SamplingSpec.for_step(Rollout, 1, 1)
    assert a.n == 4 and a.max_new_tokens == 16 and a.seed == 1 and b.seed == 1_000_004
    assert SamplingSpec.for_step(Rollout, 0, 1) == a


def test_arrow_round_trip_is_exact():
    from ray_rlhf.records import rollout_batch_from_arrow

    rng = np.random.default_rng(5)
    b = random_batch(rng, 6).with_rewards(rng.random(6), {"f": rng.random(6), "m:g": rng.random(6)})
    back = rollout_batch_from_arrow(b.to_arrow(step=3))
    for name in ("prompt_index", "sample_index", "policy_version", "prompt_ids", "prompt_offsets", "response_ids",
                 "response_offsets", "sampler_logprobs", "reward"):
        assert np.array_equal(getattr(back, name), getattr(b, name)), name
    assert back.finish_reason.tolist() == b.finish_reason.tolist() and back.prompt == b.prompt
    assert back.response == b.response and back.columns == b.columns
    assert {k: v.tolist() for k, v in back.reward_parts.items()} == {k: v.tolist() for k, v in b.reward_parts.items()}


# ------------------------------------------------------------------------------ truncated (finish reason "length")

FINISH = ["stop", "length", "length", "stop", "length"]


def by_finish(reasons, start=0) -> RolloutBatch:
    return make_batch([dict(prompt_index=start + i, finish_reason=f, reward=float(i), response="r" * (i + 1))
                       for i, f in enumerate(reasons)])


def test_truncated_is_finish_reason_length_through_concat_select_and_rewards():
    a, b = by_finish(FINISH), by_finish(["length", "stop"], start=10)
    assert a.truncated.dtype == np.bool_ and a.truncated.tolist() == [False, True, True, False, True]
    whole = RolloutBatch.concat([a, b])
    assert whole.truncated.tolist() == [False, True, True, False, True, True, False]
    # rows 5, 0, 2, 2 of the concatenation: length, stop, length, length
    assert whole.select([5, 0, 2, 2]).truncated.tolist() == [True, False, True, True]
    assert whole.select([]).truncated.shape == (0,)
    scored = whole.with_rewards(np.zeros(7), {"f": np.ones(7)})
    assert scored.truncated.tolist() == whole.truncated.tolist()


def test_truncated_survives_the_parquet_rollout_log(tmp_path):
    from ray_rlhf.metrics import RolloutLogger, read_rollouts
    from ray_rlhf.records import rollout_batch_from_arrow

    b = by_finish(FINISH)
    with RolloutLogger(tmp_path) as log:
        log.write(3, b)
    table = read_rollouts(tmp_path)
    assert table.schema.field("finish_reason").type == pa.string()
    assert table.column("finish_reason").to_pylist() == FINISH
    assert rollout_batch_from_arrow(table).truncated.tolist() == [False, True, True, False, True]


def test_from_sequences_refuses_an_unknown_finish_reason():
    with pytest.raises(ValueError, match=r"finish_reason must be one of \('stop', 'length', .*\), got \['abort'\]"):
        by_finish(["stop", "abort"])


def test_collate_carries_truncated_through_select_to_and_trimmed():
    t = collate(by_finish(FINISH), pad_id=0)
    assert t.truncated.dtype == torch.bool and t.truncated.tolist() == [False, True, True, False, True]
    assert t.select(torch.tensor([4, 0, 1])).truncated.tolist() == [True, False, True]
    assert t.to("cpu").truncated.tolist() == t.truncated.tolist()
    # rows 0 and 3 (stop) only: responses of 1 and 4 tokens -> trimmed to 4 columns, flags kept
    sub = t.select(torch.tensor([0, 3])).trimmed()
    assert sub.response_ids.shape[1] == 4 and sub.truncated.tolist() == [False, False]


class ScriptedLM:
    """Stands in for a transformers causal LM: ``generate`` returns fixed new tokens (with HF's
    padding after EOS) and uniform scores, so the sampler's bookkeeping can be checked by hand."""

    def __init__(self, new_tokens: list[list[int]], vocab: int = 8):
        self.new, self.vocab, self.training = torch.tensor(new_tokens), vocab, False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, max_new_tokens, **kw):
        assert self.new.shape == (len(input_ids), max_new_tokens)
        scores = tuple(torch.zeros(len(input_ids), self.vocab) for _ in range(max_new_tokens))
        return SimpleNamespace(sequences=torch.cat([input_ids, self.new], 1), scores=scores)


def test_hf_sampler_marks_samples_without_eos_as_truncated():
    from ray_rlhf.bench.hf_sampler import hf_generate

    eos, pad = 2, 0
    tok = SimpleNamespace(eos_token_id=eos, pad_token_id=pad, decode=lambda ids, **kw: " ".join(map(str, ids)))
    # max_new_tokens 3: EOS 2nd (then HF's padding) -> stop, 2 tokens; no EOS -> length, 3 tokens;
    # EOS as the 3rd and last allowed token -> stop, 3 tokens; EOS first -> stop, 1 token
    lm = ScriptedLM([[5, eos, pad], [5, 6, 7], [5, 6, eos], [eos, pad, pad]])
    prompts = [PromptItem(0, "a", (1, 4)), PromptItem(1, "b", (1,))]
    b = hf_generate(lm, tok, prompts, SamplingSpec(n=2, max_new_tokens=3))
    assert b.finish_reason.tolist() == ["stop", "length", "stop", "stop"]
    assert b.truncated.tolist() == [False, True, False, False]
    assert b.response_lengths.tolist() == [2, 3, 3, 1]
    assert rows_of(b.response_ids, b.response_offsets) == [[5, eos], [5, 6, 7], [5, 6, eos], [eos]]
