"""SFT and preference files: rows read from JSON Lines and Parquet, bad rows refused in one line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_rlhf.data.pairs import load_preferences, load_sft
from ray_rlhf.errors import UserError
from ray_rlhf.learning.batch import pad_batch


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_sft_rows_from_prompt_response_and_messages(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "a", "response": "b"},
                         {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]}])
    rows = load_sft(p)
    assert rows[0].prompt == "a" and rows[0].response == "b"
    assert rows[1].prompt == [{"role": "user", "content": "q"}] and rows[1].response == "ans"


def test_preferences_from_parquet_with_margin_and_messages(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "x", "chosen": "good", "rejected": "bad", "margin": 2.0}]), p)
    [row] = load_preferences(p)
    assert (row.chosen, row.rejected, row.margin) == ("good", "bad", 2.0)
    p = jsonl(tmp_path, [{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "c"}],
                          "rejected": [{"role": "assistant", "content": "r"}]}])
    [row] = load_preferences(p)
    assert (row.chosen, row.rejected, row.margin) == ("c", "r", 0.0)


@pytest.mark.parametrize("rows,loader,match", [
    ([{"prompt": "x", "rejected": "r"}], load_preferences, "has no 'chosen'"),
    ([{"prompt": "x", "chosen": "c"}], load_preferences, "has no 'rejected'"),
    ([{"prompt": "x", "chosen": "c", "rejected": "c"}], load_preferences, "chosen equals rejected in every row"),
    ([{"prompt": "x"}], load_sft, "has no 'response'"),
])
def test_bad_rows_are_one_line_user_errors(tmp_path, rows, loader, match):
    with pytest.raises(UserError, match=match) as e:
        loader(jsonl(tmp_path, rows))
    assert "\n" not in str(e.value)


def test_pad_batch_left_pads_prompts_and_right_pads_responses():
    b = pad_batch([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0)
    assert b.prompt_ids.tolist() == [[1, 2], [0, 3]] and b.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert b.response_ids.tolist() == [[4, 0, 0], [5, 6, 7]]
    assert torch.equal(b.response_mask, torch.tensor([[1.0, 0, 0], [1, 1, 1]]))
    assert b.lengths.tolist() == [3, 4]
