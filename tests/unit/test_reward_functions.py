"""Reward functions that see dataset columns (per sample, batched, async), the verifiable rewards,
and the bundled letters chat set."""

from __future__ import annotations

import asyncio
import math
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_rlhf.data import make_letters
from ray_rlhf.errors import UserError
from ray_rlhf.rewards import verifiable
from ray_rlhf.rewards.functions import RewardError, RewardFn, resolve_reward_fn

HERE = __name__  # the functions below are referred to as f"{HERE}:<name>"


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------- reward functions under test


def length(prompt: str, response: str) -> float:
    return float(len(response))


def answer_only(prompt, response, answer):
    return 1.0 if response == answer else 0.0


def answer_and_bonus(prompt, response, answer, bonus=0.5):
    return (1.0 if response == answer else 0.0) + bonus


def keyword_only(prompt, response, *, letter):
    return response.count(letter)


def sees_all(prompt, response, **columns):
    return float(len(columns))


SEEN_KWARGS: list[dict] = []


def records_kwargs(prompt, response, **columns):
    SEEN_KWARGS.append(columns)
    return 0.0


def batch_lengths(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    return [len(r) + (10 if r == a else 0) for r, a in zip(responses, answer)]


async def async_length(prompt, response, delay=0.0):
    await asyncio.sleep(delay)
    return float(len(response))


ACTIVE = {"now": 0, "peak": 0}


async def async_counted(prompt, response):
    ACTIVE["now"] += 1
    ACTIVE["peak"] = max(ACTIVE["peak"], ACTIVE["now"])
    await asyncio.sleep(0.01)
    ACTIVE["now"] -= 1
    return 1.0


async def async_batch(prompts, responses, letter):
    await asyncio.sleep(0)
    return [r.count(l) for r, l in zip(responses, letter)]


async def async_raises_on_boom(prompt, response):
    if "boom" in response:
        raise KeyError("boom")
    return 0.0


def batch_wrong_length(prompts, responses):
    return [0.0] * (len(prompts) - 1)


def batch_returns_float(prompts, responses):
    return 0.5


def batch_nan_second(prompts, responses):
    return [0.0, math.nan] + [0.0] * (len(prompts) - 2)


def batch_raises(prompts, responses):
    raise RuntimeError("judge down")


def nan_on_boom(prompt, response):
    return math.nan if "boom" in response else 0.0


def string_on_boom(prompt, response):
    return "0.5" if "boom" in response else 0.0


def raises_on_boom(prompt, response):
    return 1 / 0 if "boom" in response else 0.0


def one_argument(response):
    return 0.0


def positional_extra(prompt, response, extra, /):
    return 0.0


NOT_CALLABLE = 3


# --------------------------------------------------------------------------------- resolving


@pytest.mark.parametrize("spec, fragment", [
    ("no_colon", "is malformed"),
    ("a:b:c", "is malformed"),
    ("tests.unit.no_such_module:f", "module 'tests.unit.no_such_module' not found"),
    (f"{HERE}:missing", "has no attribute 'missing'"),
    (f"{HERE}:NOT_CALLABLE", "is a int, not a function"),
])
def test_resolve_errors_are_one_line(spec, fragment):
    with pytest.raises(UserError) as info:
        resolve_reward_fn(spec)
    assert fragment in one_line(info.value)


def test_import_failure_of_the_users_module(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_mod.py").write_text("x = undefined_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="raised NameError") as info:
        resolve_reward_fn("broken_reward_mod:f")
    one_line(info.value)


@pytest.mark.parametrize("name", ["one_argument", "positional_extra"])
def test_signature_fitting_neither_form(name):
    with pytest.raises(UserError) as info:
        resolve_reward_fn(f"{HERE}:{name}", columns=["extra"])
    msg = one_line(info.value)
    assert f"{HERE}:{name}" in msg and "fits neither accepted form" in msg
    assert "fn(prompt: str, response: str, **columns) -> float (kind: sample)" in msg
    assert "fn(prompts: list[str], responses: list[str], **columns) -> list[float] (kind: batch)" in msg


def test_required_parameter_without_a_column():
    with pytest.raises(UserError) as info:
        resolve_reward_fn(f"{HERE}:answer_only", columns=["letter", "data_source"])
    msg = one_line(info.value)
    assert f"{HERE}:answer_only" in msg and "requires parameter 'answer'" in msg
    assert "available columns: 'letter', 'data_source'" in msg
    with pytest.raises(UserError, match="available columns: none"):
        resolve_reward_fn(f"{HERE}:keyword_only")


def test_bad_kind_and_concurrency():
    with pytest.raises(UserError, match="has kind 'batched'; use 'sample'"):
        resolve_reward_fn(f"{HERE}:length", kind="batched")
    with pytest.raises(UserError, match="max_concurrency is 0"):
        resolve_reward_fn(f"{HERE}:length", max_concurrency=0)


# ---------------------------------------------------------------------------------- per sample


def test_per_sample_without_columns_ignores_them():
    fn = resolve_reward_fn(f"{HERE}:length", columns=["answer"])
    assert isinstance(fn, RewardFn) and fn.wanted == ()
    assert fn(["p", "p"], ["ab", "abcd"], {"answer": ["x", "y"]}) == [2.0, 4.0]
    assert fn([], [], {}) == []


def test_per_sample_with_columns_gets_each_rows_value():
    fn = resolve_reward_fn("ray_rlhf.rewards.verifiable:target_letter_frequency", columns=["letter", "data_source"])
    # "eel" with letter e: 2/3; "aab." with letter a: 2/4.
    out = fn(["p", "p"], ["eel", "aab."], {"letter": ["e", "a"], "data_source": ["letters", "letters"]})
    assert out == pytest.approx([2 / 3, 0.5])


def test_only_the_columns_it_names_and_defaults_kept():
    fn = resolve_reward_fn(f"{HERE}:answer_only", columns=["answer", "letter"])
    assert fn(["p", "p"], ["7", "8"], {"answer": ["7", "9"], "letter": ["e", "e"]}) == [1.0, 0.0]
    # bonus has a default and no column: the default 0.5 is kept.
    fn = resolve_reward_fn(f"{HERE}:answer_and_bonus", columns=["answer"])
    assert fn(["p"], ["7"], {"answer": ["7"]}) == [1.5]
    # ... and a column of that name overrides it.
    fn = resolve_reward_fn(f"{HERE}:answer_and_bonus", columns=["answer", "bonus"])
    assert fn(["p"], ["7"], {"answer": ["7"], "bonus": [2.0]}) == [3.0]
    # Keyword-only parameters are columns too.
    fn = resolve_reward_fn(f"{HERE}:keyword_only", columns=["letter"])
    assert fn(["p"], ["sass"], {"letter": ["s"]}) == [3.0]


def test_var_kwargs_gets_every_column_except_prompt_and_response():
    fn = resolve_reward_fn(f"{HERE}:sees_all", columns=["answer", "letter", "data_source"])
    assert fn.wanted is None
    assert fn(["p"], ["r"], {"answer": ["1"], "letter": ["e"], "data_source": ["x"]}) == [3.0]
    SEEN_KWARGS.clear()
    fn = resolve_reward_fn(f"{HERE}:records_kwargs", columns=["prompt", "answer"])
    fn(["p"], ["r"], {"prompt": ["clashing"], "answer": ["1"]})
    assert SEEN_KWARGS == [{"answer": "1"}]


def test_missing_column_at_call_time():
    fn = resolve_reward_fn(f"{HERE}:answer_only", columns=["answer"])
    with pytest.raises(RewardError, match="requires column\\(s\\) 'answer' but the batch carries 'letter'"):
        fn(["p"], ["r"], {"letter": ["e"]})


def test_existing_rule_reads_the_letter_column():
    fn = resolve_reward_fn("ray_rlhf.rewards.rules:letter_frequency", columns=["letter"])
    # "aaee": with the default letter e it would be 0.5 for both; the column says a, then e.
    assert fn(["p", "p"], ["aaae", "aaae"], {"letter": ["a", "e"]}) == [0.75, 0.25]


# --------------------------------------------------------------------------------------- batch


def test_batched():
    fn = resolve_reward_fn(f"{HERE}:batch_lengths", kind="batch", columns=["answer"])
    # len + 10 when the response equals the answer: "ab" != "x" -> 2; "xyz" == "xyz" -> 13.
    assert fn(["p", "q"], ["ab", "xyz"], {"answer": ["x", "xyz"]}) == [2.0, 13.0]


def test_batched_wrong_length():
    fn = resolve_reward_fn(f"{HERE}:batch_wrong_length", kind="batch")
    with pytest.raises(RewardError) as info:
        fn(["p", "q", "r"], ["a", "b", "c"], {})
    msg = one_line(info.value)
    assert f"{HERE}:batch_wrong_length" in msg and "returned 2 values for a batch of 3 samples" in msg
    assert info.value.batch_index is None and info.value.source == f"{HERE}:batch_wrong_length"


def test_batched_returning_a_float_hints_at_kind():
    fn = resolve_reward_fn(f"{HERE}:batch_returns_float", kind="batch")
    with pytest.raises(RewardError, match="must return a list of 2 floats \\(declare kind: sample"):
        fn(["p", "q"], ["a", "b"], {})


# --------------------------------------------------------------------------------------- async


def test_async_per_sample_runs_concurrently():
    fn = resolve_reward_fn(f"{HERE}:async_length", columns=["delay"])
    assert fn.is_async
    n = 20
    t0 = time.perf_counter()
    out = fn(["p"] * n, ["x" * i for i in range(n)], {"delay": [0.1] * n})
    elapsed = time.perf_counter() - t0
    assert out == [float(i) for i in range(n)]
    assert elapsed < 1.0  # 20 x 0.1 s in sequence would take 2 s


def test_async_per_sample_concurrency_is_bounded():
    ACTIVE.update(now=0, peak=0)
    fn = resolve_reward_fn(f"{HERE}:async_counted", max_concurrency=3)
    assert fn(["p"] * 10, ["r"] * 10, {}) == [1.0] * 10
    assert ACTIVE["peak"] == 3


def test_async_batched():
    fn = resolve_reward_fn(f"{HERE}:async_batch", kind="batch", columns=["letter"])
    assert fn(["p", "p"], ["sass", "tot"], {"letter": ["s", "t"]}) == [3.0, 2.0]


def test_async_called_from_inside_a_running_loop():
    fn = resolve_reward_fn(f"{HERE}:async_length")

    async def main():
        return fn(["p"], ["abc"], {}), await fn.acall(["p"], ["ab"], {})

    assert asyncio.run(main()) == ([3.0], [2.0])


def test_async_raising_names_the_sample():
    fn = resolve_reward_fn(f"{HERE}:async_raises_on_boom")
    with pytest.raises(RewardError) as info:
        fn(["p"] * 3, ["ok", "ok", "boom"], {})
    msg = one_line(info.value)
    assert "raised KeyError" in msg and "on sample 2 of the batch" in msg and info.value.batch_index == 2


# ---------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("name, fragment", [
    ("nan_on_boom", "returned nan (float)"),
    ("string_on_boom", "returned '0.5' (str)"),
    ("raises_on_boom", "raised ZeroDivisionError: division by zero"),
])
def test_bad_value_names_function_and_sample(name, fragment):
    fn = resolve_reward_fn(f"{HERE}:{name}")
    with pytest.raises(RewardError) as info:
        fn(["p"] * 3, ["fine", "boom here", "fine"], {})
    msg = one_line(info.value)
    assert f"{HERE}:{name}" in msg and fragment in msg and "on sample 1 of the batch" in msg
    assert info.value.batch_index == 1 and isinstance(info.value, UserError)


def test_where_labels_are_used():
    fn = resolve_reward_fn(f"{HERE}:nan_on_boom")
    with pytest.raises(RewardError, match="on prompt 4 sample 0"):
        fn(["p"], ["boom"], {}, where=["prompt 4 sample 0"])


def test_batched_nan_names_the_sample():
    fn = resolve_reward_fn(f"{HERE}:batch_nan_second", kind="batch")
    with pytest.raises(RewardError) as info:
        fn(["p"] * 3, ["a", "b", "c"], {})
    msg = one_line(info.value)
    assert "returned nan (float) on sample 1 of the batch" in msg and info.value.batch_index == 1


def test_batched_raising():
    fn = resolve_reward_fn(f"{HERE}:batch_raises", kind="batch")
    with pytest.raises(RewardError) as info:
        fn(["p"] * 2, ["a", "b"], {})
    msg = one_line(info.value)
    assert f"{HERE}:batch_raises" in msg and "raised RuntimeError: judge down on a batch of 2 samples" in msg


# ----------------------------------------------------------------------------------- verifiable


@pytest.mark.parametrize("response, letter, expected", [
    ("eel", "e", 2 / 3),         # e, e of 3 characters
    ("Eve e", "E", 3 / 5),       # E, e, e of 5 (case-insensitive; the space counts)
    ("banana", "a", 3 / 6),
    ("xyz", "e", 0.0),
    ("", "e", 0.0),              # empty response
])
def test_target_letter_frequency(response, letter, expected):
    assert verifiable.target_letter_frequency("ignored", response, letter) == pytest.approx(expected, abs=1e-12)


def test_target_letter_frequency_rejects_a_bad_letter():
    with pytest.raises(ValueError, match="one character"):
        verifiable.target_letter_frequency("p", "abc", "ab")


@pytest.mark.parametrize("response, answer, expected", [
    ("She has 3 apples, then 5. The answer is 72.", "72", 1.0),   # last number wins
    ("The answer is 72", "Natalia sold 48 ... #### 72", 1.0),     # GSM8K answer column
    ("Total: 1,234 dollars", "1234", 1.0),                        # thousands separator
    ("It is 72.0", 72, 1.0),                                      # by value, int column
    ("It is -3.", "-3", 1.0),
    ("72 first, then 71", "72", 0.0),
    ("no number at all", "72", 0.0),
])
def test_exact_answer(response, answer, expected):
    assert verifiable.exact_answer("q", response, answer) == expected


def test_exact_answer_rejects_an_answer_without_a_number():
    with pytest.raises(ValueError, match="holds no number"):
        verifiable.exact_answer("q", "7", "seven")


# ------------------------------------------------------------------------------ letters dataset


def test_bundled_letters_file_schema_and_content():
    path = make_letters.bundled_letters_path()
    assert path.is_file(), "run: python -m ray_rlhf.data.make_letters"
    schema = pq.read_schema(path)
    assert schema.equals(make_letters.SCHEMA)
    assert schema.field("messages").type.value_type == pa.struct([("role", pa.string()), ("content", pa.string())])
    rows = pq.read_table(path).to_pylist()
    assert 100 <= len(rows) <= 1000
    counts = {letter: sum(r["letter"] == letter for r in rows) for letter in make_letters.LETTERS}
    assert set(counts.values()) == {len(rows) // len(make_letters.LETTERS)}  # balanced
    for r in rows:
        assert r["data_source"] == "letters"
        roles = [m["role"] for m in r["messages"]]
        assert roles in (["user"], ["system", "user"])
        assert f"{r['letter']}'s" in r["messages"][-1]["content"] or f" {r['letter']}" in r["messages"][-1]["content"]


def test_letters_are_reproducible(tmp_path):
    out = make_letters.write_letters(tmp_path / "letters.parquet")
    assert pq.read_table(out).equals(pq.read_table(make_letters.bundled_letters_path()))
    assert make_letters.generate_rows(50, seed=1) == make_letters.generate_rows(50, seed=1)
    assert make_letters.generate_rows(50, seed=1) != make_letters.generate_rows(50, seed=2)


def test_letters_user_messages_are_short():
    from ray_rlhf.models.factory import train_tokenizer

    tok = train_tokenizer(512)
    lengths = [len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
               for r in make_letters.generate_rows()]
    assert max(lengths) < 30
