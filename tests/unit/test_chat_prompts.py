"""Chat prompts and dataset columns: loading, validation, chat templates, the prompt-length check."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_rlhf.data.prompts import bundled_letters_path, load_prompt_table, tokenize_prompts
from ray_rlhf.errors import UserError
from ray_rlhf.models.factory import train_tokenizer
from tests.architectures import build_tokenizer

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@pytest.fixture(scope="module")
def chat_tok():
    return build_tokenizer("qwen2")  # ChatML template, no BOS


@pytest.fixture(scope="module")
def plain_tok():
    tok = train_tokenizer(512)
    tok.chat_template = None  # a base model's tokenizer: no chat template
    return tok


def write_chat(path, rows):
    pq.write_table(pa.table({"messages": pa.array([r[0] for r in rows], MESSAGES),
                             "answer": [r[1] for r in rows]}), path)
    return path


def test_messages_and_other_columns_load_row_by_row(tmp_path):
    path = write_chat(tmp_path / "c.parquet", [([{"role": "user", "content": "2+2?"}], "4"),
                                               ([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "3+4?"}], "7")])
    t = load_prompt_table(path, "messages")
    assert t.prompts[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4?"}]
    assert t.columns == {"answer": ["4", "7"]}


def test_jsonl_messages_load_too(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}], "answer": i})
                              for i in range(3)))
    t = load_prompt_table(path, "messages")
    assert [p[0]["content"] for p in t.prompts] == ["q0", "q1", "q2"] and t.columns["answer"] == [0, 1, 2]


@pytest.mark.parametrize("cell, needle", [
    ([], "not a list of chat messages"),
    ([{"role": "user"}], "not a {role, content} object"),
    ([{"role": "user", "content": None}], "not a {role, content} object"),
])
def test_a_bad_messages_cell_is_one_line_naming_the_row(tmp_path, cell, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n"
                    + json.dumps({"messages": cell}) + "\n")
    with pytest.raises(UserError) as e:
        load_prompt_table(path, "messages")
    msg = str(e.value)
    assert "\n" not in msg and "row 1 of column 'messages'" in msg and needle in msg


def test_template_applied_with_generation_prompt_and_counted_in_the_length(chat_tok):
    msgs = [{"role": "user", "content": "Hi there"}]
    [item] = tokenize_prompts([msgs], chat_tok, max_prompt_tokens=64, columns={"answer": ["x"]})
    want = chat_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert item.text == want and item.text.endswith("<|im_start|>assistant\n")
    assert list(item.prompt_ids) == chat_tok(want, add_special_tokens=False)["input_ids"]
    assert item.columns == {"answer": "x"}
    n = len(item.prompt_ids)
    with pytest.raises(UserError, match=f"is {n} tokens, longer than data.max_prompt_tokens={n - 1}"):
        tokenize_prompts([msgs], chat_tok, max_prompt_tokens=n - 1)


def test_system_prompt_and_always_mode(chat_tok):
    [item] = tokenize_prompts(["Hello"], chat_tok, 64, chat_template="always", system_prompt="You are terse.")
    assert item.text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello")
    [plain] = tokenize_prompts(["Hello"], chat_tok, 64)  # auto: text stays text
    assert plain.text == "Hello"


def test_no_chat_template_is_one_line(plain_tok):
    with pytest.raises(UserError, match="has none; use an instruct model with a chat template"):
        tokenize_prompts([[{"role": "user", "content": "x"}]], plain_tok, 64)
    with pytest.raises(UserError, match="data.chat_template=never"):
        tokenize_prompts([[{"role": "user", "content": "x"}]], plain_tok, 64, chat_template="never")


def test_bundled_letters_set_is_chat_with_a_letter_column(chat_tok):
    t = load_prompt_table(bundled_letters_path(), "messages")
    assert len(t.prompts) > 100 and set(t.columns) >= {"letter", "data_source"}
    items = tokenize_prompts(t.prompts, chat_tok, 64, columns=t.columns)
    assert all(len(i.columns["letter"]) == 1 for i in items)
