"""Prompt loading (Parquet, JSON Lines, every user error), the bundled set, and PromptStream."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_rlhf.data.make_prompts import generate_prompts, write_prompts
from ray_rlhf.data.prompts import PromptStream, bundled_prompts_path, load_prompt_table, load_prompts
from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem

PROMPTS = ["Once upon a time", "The sun is", "Tell me about bees."]


def _parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


def _jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------- load_prompts


def test_load_parquet(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"prompt": PROMPTS, "id": [1, 2, 3]})
    assert load_prompts(path) == PROMPTS


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".JSONL"])
def test_load_jsonl(tmp_path, suffix):
    path = _jsonl(tmp_path / f"p{suffix}", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])
    assert load_prompts(path) == PROMPTS


def test_load_other_column(tmp_path):
    pq_path = _parquet(tmp_path / "p.parquet", {"text": PROMPTS})
    js_path = _jsonl(tmp_path / "p.jsonl", [{"text": p} for p in PROMPTS])
    assert load_prompts(pq_path, column="text") == PROMPTS
    assert load_prompts(str(js_path), column="text") == PROMPTS


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.parquet does not exist.*data\.prompts_path"):
        load_prompts(tmp_path / "nope.parquet")


def test_unknown_extension(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nhello\n")
    with pytest.raises(UserError, match=r"p\.csv has unknown extension '\.csv'.*\.parquet or \.jsonl"):
        load_prompts(path)


def test_malformed_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"this is not a parquet file at all")
    with pytest.raises(UserError, match=r"p\.parquet is not valid Parquet"):
        load_prompts(path)


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "broken\n')
    with pytest.raises(UserError, match=r"p\.jsonl is not valid JSON Lines"):
        load_prompts(path)


@pytest.mark.parametrize("make", ["parquet", "jsonl"])
def test_missing_column_lists_available(tmp_path, make):
    if make == "parquet":
        path = _parquet(tmp_path / "p.parquet", {"text": PROMPTS, "id": [1, 2, 3]})
    else:
        path = _jsonl(tmp_path / "p.jsonl", [{"text": p, "id": 1} for p in PROMPTS])
    with pytest.raises(UserError, match=r"no column 'prompt' \(available columns: 'text', 'id'\).*prompt_column") as e:
        load_prompts(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        load_prompts(path)


def test_jsonl_with_only_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UserError, match="contains no prompts"):
        load_prompts(path)


def test_parquet_with_no_rows(tmp_path):
    path = _parquet(tmp_path / "p.parquet", {"prompt": pa.array([], type=pa.string())})
    with pytest.raises(UserError, match="contains no prompts"):
        load_prompts(path)


@pytest.mark.parametrize("make", ["parquet", "jsonl"])
def test_non_string_prompts(tmp_path, make):
    if make == "parquet":
        path = _parquet(tmp_path / "p.parquet", {"prompt": [1, 2, 3]})
    else:
        path = _jsonl(tmp_path / "p.jsonl", [{"prompt": 1}, {"prompt": 2}])
    with pytest.raises(UserError, match="has type int64, neither text nor a list of chat messages"):
        load_prompts(path)


@pytest.mark.parametrize("bad, what", [(None, "is null"), ("", "is an empty prompt"), ("  \t", "is an empty prompt")])
@pytest.mark.parametrize("make", ["parquet", "jsonl"])
def test_null_or_empty_prompt_names_the_row(tmp_path, make, bad, what):
    values = ["fine", bad, "also fine"]
    if make == "parquet":
        path = _parquet(tmp_path / "p.parquet", {"prompt": pa.array(values, type=pa.string())})
    else:
        path = _jsonl(tmp_path / "p.jsonl", [{"prompt": v} for v in values])
    with pytest.raises(UserError, match=f"row 1 of column 'prompt' {what}"):
        load_prompts(path)


def test_all_null_column(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": None}, {"prompt": None}])
    with pytest.raises(UserError, match="row 0 of column 'prompt' is null"):
        load_prompts(path)


def test_invalid_utf8_in_jsonl_names_the_line(tmp_path):
    # Blank lines are skipped by the reader, so the bad row (row 2) sits on line 4 of the file.
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n\n{"prompt": "fine"}\n{"prompt": "bad \xff\xfe here"}\n')
    with pytest.raises(UserError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{path}: line 4" in msg and "column 'prompt'" in msg and "not valid UTF-8" in msg
    assert "byte 0xff" in msg and "UTF-8" in msg.split(";")[-1]  # the fix: re-encode the file


def test_invalid_utf8_in_another_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "\xe9t\xe9"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl: line 2 \(column 'answer'\) is not valid UTF-8 \(byte 0xe9\)"):
        load_prompt_table(path)


def test_invalid_utf8_in_chat_messages(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    with pytest.raises(UserError, match=r"line 1 \(column 'messages'\) is not valid UTF-8"):
        load_prompts(path, column="messages")


def test_invalid_utf8_in_parquet_names_the_row(tmp_path):
    # Parquet does not check UTF-8 on write: raw bytes viewed as a string column are stored as they are.
    bad = pa.array([b"fine", b"also fine", b"x\xff\xfe"]).view(pa.string())
    path = _parquet(tmp_path / "p.parquet", {"prompt": bad})
    with pytest.raises(UserError, match=r"p\.parquet: row 2 of column 'prompt' is not valid UTF-8 \(byte 0xff\)"):
        load_prompts(path)


# ------------------------------------------------------------------------------ bundled prompts


def test_bundled_prompts_are_reproducible(tmp_path):
    prompts = load_prompts(bundled_prompts_path())
    assert prompts == generate_prompts()  # the committed file is what make_prompts makes
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    again = load_prompts(write_prompts(tmp_path / "again.parquet"))
    assert again == prompts
    assert generate_prompts(50, seed=1) != generate_prompts(50, seed=0)


def test_bundled_prompts_are_short_for_the_tiny_tokenizer():
    from ray_rlhf.models.factory import PRESETS, train_tokenizer

    tok = train_tokenizer(PRESETS["tiny"].vocab_size)
    lengths = [len(ids) for ids in tok(load_prompts(bundled_prompts_path()))["input_ids"]]
    assert max(lengths) < 24  # <s> included


# -------------------------------------------------------------------------------- PromptStream


def _reference_order(seed: int, epoch: int, n: int) -> list[int]:
    """The documented order: numpy permutation seeded with (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def test_stream_batches_follow_the_per_epoch_permutation_across_epochs():
    prompts = [f"p{i}" for i in range(5)]
    stream = PromptStream(prompts, seed=7)
    e0, e1, e2 = (_reference_order(7, e, 5) for e in range(3))
    # 5 prompts per epoch, batches of 3: [e0[0:3]], [e0[3:5] + e1[0:1]], [e1[1:4]], [e1[4] + e2[0:2]]
    expected = [e0[0:3], e0[3:5] + e1[0:1], e1[1:4], e1[4:5] + e2[0:2]]
    for want in expected:
        batch = stream.next_batch(3)
        assert batch == [PromptItem(index=i, text=f"p{i}") for i in want]
    assert stream.state_dict() == {"epoch": 2, "position": 2}


def test_each_epoch_visits_every_prompt_once():
    stream = PromptStream([f"p{i}" for i in range(10)], seed=0)
    for _ in range(3):
        assert sorted(item.index for item in stream.next_batch(10)) == list(range(10))


def test_reshuffle_is_deterministic_per_epoch():
    prompts = [f"p{i}" for i in range(50)]
    a, b = PromptStream(prompts, seed=3), PromptStream(prompts, seed=3)
    assert [a.epoch_order(e) for e in range(4)] == [b.epoch_order(e) for e in range(4)]
    assert a.epoch_order(0) != a.epoch_order(1)  # a fresh shuffle each epoch
    assert PromptStream(prompts, seed=4).epoch_order(0) != a.epoch_order(0)
    # An epoch's order does not depend on which epochs were computed before it.
    assert PromptStream(prompts, seed=3).epoch_order(2) == a.epoch_order(2)


def test_batch_larger_than_the_dataset():
    stream = PromptStream(["a", "b"], seed=0)
    batch = stream.next_batch(5)  # epochs 0, 1 and half of 2
    assert [i.index for i in batch] == _reference_order(0, 0, 2) + _reference_order(0, 1, 2) + _reference_order(0, 2, 2)[:1]
    assert stream.state_dict() == {"epoch": 2, "position": 1}


@pytest.mark.parametrize("cut", [0, 1, 4, 7, 13])
def test_resumed_stream_matches_uninterrupted(cut):
    prompts = [f"p{i}" for i in range(7)]
    sizes = [3, 4, 2, 5, 3, 6, 1, 3, 4, 2, 5, 3, 4, 4]
    full = PromptStream(prompts, seed=11)
    uninterrupted = [full.next_batch(n) for n in sizes]

    first = PromptStream(prompts, seed=11)
    head = [first.next_batch(n) for n in sizes[:cut]]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = PromptStream(prompts, seed=11)
    resumed.load_state_dict(state)
    tail = [resumed.next_batch(n) for n in sizes[cut:]]
    assert head + tail == uninterrupted


def test_bad_stream_state_and_arguments():
    stream = PromptStream(["a", "b", "c"], seed=0)
    with pytest.raises(UserError, match="bad prompt-stream state"):
        stream.load_state_dict({"epoch": 1})
    with pytest.raises(UserError, match="does not fit a set of 3 prompts"):
        stream.load_state_dict({"epoch": 0, "position": 3})
    with pytest.raises(UserError, match="does not fit"):
        stream.load_state_dict({"epoch": -1, "position": 0})
    with pytest.raises(ValueError):
        stream.next_batch(0)
    with pytest.raises(UserError, match="prompt set is empty"):
        PromptStream([], seed=0)
