"""A tool environment's schemas reach the model from the first render: the dataset's prompts are
rendered with ``tools=`` (:func:`ray_rlhf.data.prompts.tokenize_prompts`, given
:func:`ray_rlhf.envs.base.env_tools` of ``env.name``), and a trajectory assembled from that prompt,
the sampled call, the ``tool`` message's delta and the answer is the whole conversation rendered at
once with the same ``tools=``."""

from __future__ import annotations

import json

import pytest

from ray_rlhf.data.prompts import tokenize_prompts
from ray_rlhf.envs.base import env_tools
from ray_rlhf.envs.tools import ToolEnv
from ray_rlhf.generation.trajectory import Sampled, TemplateDelta, TrajectoryLimits, run_trajectories

QWEN_WITH_TOOLS = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


class Adder(ToolEnv):
    tools = [{"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}}]

    def add(self, a, b):
        return a + b

    def reward(self, answer):
        return float("5" in answer)


@pytest.fixture(scope="module")
def tok():
    from ray_rlhf.models.factory import train_tokenizer

    t = train_tokenizer(512)
    t.chat_template = QWEN_WITH_TOOLS
    return t


def test_prompts_are_rendered_with_the_environments_tools(tok):
    tools = env_tools(f"{__name__}:Adder")
    assert tools == Adder.tools and env_tools("ray_rlhf.envs.letters:LetterGame") is None
    msgs = [[{"role": "user", "content": "What is 2 + 3?"}]]
    with_tools, = tokenize_prompts(msgs, tok, 400, tools=tools)
    without, = tokenize_prompts(msgs, tok, 400)
    schema = json.dumps(Adder.tools[0])  # the template's tojson: the same text
    assert schema in with_tools.text and schema not in without.text
    assert schema in tok.decode(list(with_tools.prompt_ids))  # the model reads it
    assert with_tools.text.endswith(without.text)  # the tools block comes first, the rest is unchanged


def test_a_tool_trajectory_is_the_whole_conversation_rendered_with_tools(tok):
    tools = env_tools(f"{__name__}:Adder")
    item, = tokenize_prompts([[{"role": "user", "content": "What is 2 + 3?"}]], tok, 400, tools=tools)
    replies = iter([CALL, " 5"])

    def sampler(requests):
        out = []
        for _ in requests:
            ids = tok(next(replies), add_special_tokens=False)["input_ids"]
            out.append(Sampled(ids, [-0.5] * len(ids), "stop", tok.decode(ids)))
        return out

    limits = TrajectoryLimits(max_new_tokens=64, max_turns=3, max_total_tokens=400, step_timeout_s=5.0)
    batch, stats = run_trajectories([item], 1, sampler, Adder, TemplateDelta(tok, tools), limits, seed=0)
    assert batch.finish_reason.tolist() == ["stop"] and stats.tool_calls == 1 and stats.tool_errors == 0
    assert float(batch.token_reward.sum()) == 1.0
    whole = TemplateDelta(tok, tools).render(
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": CALL},
         {"role": "tool", "content": "5"}, {"role": "assistant", "content": " 5"}], add_generation_prompt=False)
    assert whole == batch.prompt[0] + batch.response[0] + "<|im_end|>\n"  # the last <|im_end|>: the model's EOS
    ids = batch.prompt_ids.tolist() + batch.response_ids.tolist()
    assert tok.decode(ids) == batch.prompt[0] + batch.response[0]


def test_the_run_renders_its_dataset_with_the_env_tools(tok, tmp_path):
    """``load_prompt_items``: the run's prompts, with ``env.name`` naming a tool environment."""
    from ray_rlhf.config import RunConfig
    from ray_rlhf.run.inputs import load_prompt_items

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a} + 1?"}], "answer": a + 1}) + "\n"
                            for a in range(16)))
    cfg = RunConfig(env={"name": f"{__name__}:Adder"}, data={"prompts_path": str(path), "max_prompt_tokens": 300},
                    generators={"max_model_len": 512})
    items = load_prompt_items(cfg, tok)
    assert all(json.dumps(Adder.tools[0]) in it.text for it in items) and items[0].columns["answer"] == 1


class AdderWithHint(Adder):
    def reset(self, row):
        super().reset(row)
        return "Use the tool."


def test_a_first_observation_after_a_prompt_rendered_with_tools(tok):
    """``reset`` returns a user message: it replaces the prompt's generation prompt (the delta after
    the user message), and the tools block stays once, at the start."""
    tools = env_tools(f"{__name__}:AdderWithHint")
    item, = tokenize_prompts([[{"role": "user", "content": "What is 2 + 3?"}]], tok, 400, tools=tools)
    replies = iter([CALL, " 5"])

    def sampler(requests):
        return [Sampled(ids, [-0.5] * len(ids), "stop", tok.decode(ids))
                for ids in (tok(next(replies), add_special_tokens=False)["input_ids"] for _ in requests)]

    limits = TrajectoryLimits(max_new_tokens=64, max_turns=3, max_total_tokens=400, step_timeout_s=5.0)
    batch, _ = run_trajectories([item], 1, sampler, AdderWithHint, TemplateDelta(tok, tools), limits, seed=0)
    whole = TemplateDelta(tok, tools).render(
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "user", "content": "Use the tool."},
         {"role": "assistant", "content": CALL}, {"role": "tool", "content": "5"},
         {"role": "assistant", "content": " 5"}], add_generation_prompt=False)
    assert whole == batch.prompt[0] + batch.response[0] + "<|im_end|>\n" and whole.count("<tools>") == 1
    assert float(batch.token_reward.sum()) == 1.0
