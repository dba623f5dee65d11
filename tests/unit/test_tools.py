"""Tool use (:mod:`ray_rlhf.envs.tools`): the Hermes/Qwen parser, tool results and errors as
``tool`` messages, schema checks, and a tool trajectory assembled with a fake sampler."""

from __future__ import annotations

import json

import pytest

from ray_rlhf.envs.base import check_tools
from ray_rlhf.envs.tools import ParsedCalls, ToolCall, ToolEnv, parse_hermes
from ray_rlhf.errors import UserError
from ray_rlhf.generation.trajectory import Sampled, TemplateDelta, TrajectoryLimits, run_trajectories
from ray_rlhf.records import PromptItem

ADD = {"type": "function", "function": {
    "name": "add", "description": "a + b",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}


class Calculator(ToolEnv):
    tools = [ADD]

    def add(self, a, b):
        return a + b

    def reward(self, answer):
        return float(str(self.row.get("answer")) in answer)


def call(name, **args):
    return f'<tool_call>{json.dumps({"name": name, "arguments": args})}</tool_call>'


def test_parse_hermes_calls_and_malformed_ones():
    assert parse_hermes("no call here") == ParsedCalls()
    text = "Let me add. " + call("add", a=2, b=3) + '\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, "b\\": 2}"}'
    p = parse_hermes(text)
    assert p.calls == [ToolCall("add", {"a": 2, "b": 3})] and len(p.errors) == 1 and "without </tool_call>" in p.errors[0]
    p = parse_hermes('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call><tool_call>{oops}</tool_call>'
                     '<tool_call>{"arguments": {}}</tool_call>')
    assert p.calls == [ToolCall("add", {"a": 1})]  # arguments as a JSON string are accepted
    assert [e.split(":")[0] for e in p.errors] == ["malformed tool call"] * 2 and "not JSON" in p.errors[0]


def test_tool_results_and_errors_come_back_as_tool_messages():
    env = Calculator()
    env.reset({"answer": 5})
    r = env.step(call("add", a=2, b=3) + call("mul", a=2, b=3) + call("add", a=1) + "<tool_call>{x}</tool_call>")
    assert not r.done and r.reward == 0
    contents = [m["content"] for m in r.observation]
    assert all(m["role"] == "tool" for m in r.observation)
    assert contents[0].startswith("error: malformed tool call")  # parse errors first, then the calls in order
    assert contents[1] == "5"
    assert contents[2] == "error: unknown tool 'mul'; available: add"
    assert contents[3].startswith("error: add raised TypeError")  # missing argument b
    assert r.info == {"tool_calls": 4, "tool_errors": 3}
    done = env.step("The answer is 5.")  # no call: the final answer, scored by reward()
    assert done.done and done.reward == 1.0 and done.info["tool_calls"] == 0


def test_pluggable_parser():
    env = Calculator(parser=lambda text: ParsedCalls([ToolCall("add", {"a": 1, "b": 1})]) if "ADD" in text
                     else ParsedCalls())
    env.reset({})
    assert env.step("ADD").observation == [{"role": "tool", "content": "2"}]
    assert Calculator(parser="ray_rlhf.envs.tools:parse_hermes").parser is parse_hermes


@pytest.mark.parametrize("tools, match", [
    ({"add": 1}, "a list"),
    ([{"type": "function"}], r"tools\[0\]: expected"),
    ([{"type": "function", "function": {"name": "2add"}}], "must be an identifier"),
    ([ADD, ADD], "declared twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "type 'object'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {}}}}}],
     "parameter 'x' needs a JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {},
                                                                     "required": ["y"]}}}], "'y' is not in"),
])
def test_invalid_tool_schemas_are_user_errors(tools, match):
    with pytest.raises(UserError, match=match):
        check_tools(tools, "my_env:Env")


def test_a_declared_tool_needs_its_method():
    class NoMethod(ToolEnv):
        tools = [ADD]

    with pytest.raises(UserError, match="declares tool 'add' but has no method"):
        NoMethod()


def test_a_tool_trajectory_appends_tool_messages_between_turns():
    from ray_rlhf.models.factory import train_tokenizer

    tok = train_tokenizer(512)
    replies = [call("add", a=2, b=3), " It is 5."]

    def sampler(requests):
        text = replies[len(sampler.calls)]
        sampler.calls.append(requests)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [Sampled(ids, [-0.1] * len(ids), "stop", text) for _ in requests]

    sampler.calls = []
    item = PromptItem(0, "What is 2 + 3?", tuple(tok("What is 2 + 3?")["input_ids"]), {"answer": 5})
    d = TemplateDelta(tok, Calculator.tools)
    batch, stats = run_trajectories([item], 1, sampler, Calculator, d, TrajectoryLimits(64, 4, 400, 5.0))
    assert batch.finish_reason.tolist() == ["stop"] and batch.turn_count.tolist() == [2]
    assert "\ntool: 5\nassistant:" in batch.response[0]
    assert batch.token_reward[-1] == 1.0 and float(batch.token_reward.sum()) == 1.0
    assert stats.tool_calls == 1 and stats.tool_errors == 0
