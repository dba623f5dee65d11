"""Agents written against the OpenAI client, without vLLM: the session bookkeeping
(:mod:`ray_rlhf.generation.agent_session`) and the chat-completions endpoint
(:mod:`ray_rlhf.generation.openai_endpoint`) driven by the real ``openai.AsyncOpenAI`` client over
127.0.0.1 with a fake engine. (tests/integration/test_multiturn_generator.py runs the endpoint on the
real vLLM engine.)"""

from __future__ import annotations

import asyncio

import pytest

from ray_rlhf.envs.base import load_agent
from ray_rlhf.errors import UserError
from ray_rlhf.generation.agent_session import Session, SessionError
from ray_rlhf.generation.openai_endpoint import run_agent_rollouts
from ray_rlhf.generation.trajectory import Sampled, TemplateDelta, TrajectoryLimits
from ray_rlhf.records import PromptItem

QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LIMITS = TrajectoryLimits(max_new_tokens=8, max_turns=3, max_total_tokens=200, step_timeout_s=5.0)


@pytest.fixture(scope="module")
def trained():
    from ray_rlhf.models.factory import train_tokenizer

    return train_tokenizer(512)


@pytest.fixture(params=[None, QWEN_LIKE], ids=["fallback", "qwen-like"])
def tok(trained, request):
    """The tiny tokenizer with no chat template (the fallback one) or a Qwen-like one."""
    trained.chat_template = request.param
    return trained


@pytest.fixture
def qtok(trained):
    """The endpoint tests: one template is enough (the session tests cover both)."""
    trained.chat_template = QWEN_LIKE
    return trained


class FakeEngine:
    """Answers each request with the ids of ``reply`` (cut at ``max_tokens``: finish ``length``),
    log-probs -0.5 - 0.01 * position; records every call (a list of requests)."""

    def __init__(self, tok, reply=" eee aaa"):
        self.tok, self.reply, self.calls = tok, reply, []

    def __call__(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            ids = self.tok(self.reply, add_special_tokens=False)["input_ids"]
            finish = "length" if len(ids) > r.max_tokens else "stop"
            ids = ids[: r.max_tokens]
            out.append(Sampled(ids, [-0.5 - 0.01 * i for i in range(len(ids))], finish, self.tok.decode(ids)))
        return out


def item(tok, i=0, text="The cat sat on"):
    return PromptItem(i, text, tuple(tok(text)["input_ids"]), {"answer": f"a{i}"})


def test_two_turns_are_sampled_ids_plus_the_observation_delta(tok):
    """Turn 1: the messages rendered once; turn 2: + the sampled ids + the new message's delta; the
    pieces add up to the whole conversation rendered at once."""
    d, engine = TemplateDelta(tok), FakeEngine(tok)
    s = Session(item(tok), 0, d, LIMITS, seed=3)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say e."}]
    req = s.prepare(first)
    text0 = d.render(first, add_generation_prompt=True)
    assert req.prompt_ids == tok(text0, add_special_tokens=tok.chat_template is None)["input_ids"]
    assert req.max_tokens == 8 and s.prompt_text == text0
    out = engine([req])[0]
    assert s.record(req, out) == ({"role": "assistant", "content": out.text}, "stop")
    # the client sends back the assistant message as returned (with the extra fields it adds)
    second = [*first, {"role": "assistant", "content": out.text, "refusal": None, "tool_calls": None},
              {"role": "user", "content": [{"type": "text", "text": "Now say a."}]}]
    req2 = s.prepare(second, max_tokens=5)
    _, obs = d.delta_ids("assistant", [{"role": "user", "content": "Now say a."}])
    assert req2.prompt_ids == req.prompt_ids + out.token_ids + obs  # token in: never re-tokenized
    assert req2.max_tokens == 5
    out2 = engine([req2])[0]
    s.record(req2, out2)
    assert out2.finish_reason == "length"  # cut at the request's max_tokens=5
    assert s.close(0.75) == 0.75 and s.finish == "length"
    assert s.ids == out.token_ids + obs + out2.token_ids
    assert s.mask == [1] * len(out.token_ids) + [0] * len(obs) + [1] * len(out2.token_ids)
    assert s.logprobs == pytest.approx(out.logprobs + [0.0] * len(obs) + out2.logprobs)
    assert s.rewards == [0.0] * (len(s.ids) - 1) + [0.75]  # the reward on the last sampled token
    strip = (lambda t: t.lstrip()) if tok.chat_template is None else (lambda t: t)  # see test_trajectory.py
    whole = d.render([*first, {"role": "assistant", "content": strip(out.text)},
                      {"role": "user", "content": "Now say a."}, {"role": "assistant", "content": strip(out2.text)}],
                     add_generation_prompt=False)
    assert whole == s.prompt_text + "".join(s.text) + ("\n" if tok.chat_template is None else "<|im_end|>\n")
    assert tok.decode(req.prompt_ids + s.ids, skip_special_tokens=False).endswith("".join(s.text))


def test_a_request_that_does_not_extend_the_conversation_is_refused(tok):
    d, engine = TemplateDelta(tok), FakeEngine(tok)
    s = Session(item(tok), 0, d, LIMITS)
    first = [{"role": "user", "content": "Say e."}]
    req = s.prepare(first)
    with pytest.raises(SessionError, match="sequential"):  # a second request while one is with the engine
        s.prepare(first)
    out = engine([req])[0]
    s.record(req, out)
    for bad in ([{"role": "user", "content": "Something else."}],
                [*first, {"role": "assistant", "content": out.text + " edited"}, {"role": "user", "content": "x"}],
                [*first, {"role": "assistant", "content": out.text}]):  # nothing new
        with pytest.raises(SessionError, match="must extend this rollout's conversation") as e:
            s.prepare(bad)
        assert e.value.status == 400 and e.value.finish is None
    assert s.finish is None and s.turns == 1  # still usable
    s.prepare([*first, {"role": "assistant", "content": out.text}, {"role": "user", "content": "ok"}])


def test_limits_end_the_trajectory_with_their_finish_reason(tok):
    d, engine = TemplateDelta(tok), FakeEngine(tok)
    s = Session(item(tok), 0, d, TrajectoryLimits(8, 1, 200, 5.0))
    msgs = [{"role": "user", "content": "hi"}]
    req = s.prepare(msgs)
    out = engine([req])[0]
    s.record(req, out)
    with pytest.raises(SessionError, match="env.max_turns=1") as e:
        s.prepare([*msgs, {"role": "assistant", "content": out.text}, {"role": "user", "content": "more"}])
    assert e.value.finish == "max_turns" and s.finish == "max_turns"
    s.close(error="BadRequestError: ...")  # the agent raised on the refusal: the limit's reason stays
    assert s.finish == "max_turns"
    long = Session(item(tok), 0, d, TrajectoryLimits(8, 3, 10, 5.0))
    with pytest.raises(SessionError, match="rollout.max_total_tokens=10"):
        long.prepare([{"role": "user", "content": "a long first message with many words in it"}])
    assert long.finish == "max_total_tokens"
    short = Session(item(tok), 0, d, TrajectoryLimits(8, 3, 40, 5.0))
    req = short.prepare(msgs)
    assert req.max_tokens == min(8, 40 - len(req.prompt_ids))


def test_close_records_errors_and_non_numbers_as_env_error(tok):
    d, engine = TemplateDelta(tok), FakeEngine(tok)
    for reward, error in ((None, "RuntimeError: boom"), ("good", None), (float("nan"), None)):
        s = Session(item(tok), 0, d, LIMITS)
        req = s.prepare([{"role": "user", "content": "hi"}])
        s.record(req, engine([req])[0])
        assert s.close(reward, error) == 0.0 and s.finish == "env_error" and sum(s.rewards) == 0


async def two_turns(client, row, letter="e"):
    """An agent as people write them: the OpenAI client, the conversation as a list of messages."""
    messages = [{"role": "user", "content": f"{row['prompt']} (say {letter})"}]
    r = await client.chat.completions.create(model="any", messages=messages, max_tokens=6, temperature=0.7)
    messages += [r.choices[0].message, {"role": "user", "content": "Again."}]  # the returned message as it is
    r2 = await client.chat.completions.create(model="any", messages=messages)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    text = r2.choices[0].message.content
    return text.count(letter) / max(len(text), 1)


async def raises(client, row):
    await client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    raise RuntimeError("the agent's own bug")


async def hangs(client, row):
    await asyncio.sleep(30)


async def edits_history(client, row):
    import openai

    first = [{"role": "user", "content": "hi"}]
    await client.chat.completions.create(model="any", messages=first)
    try:
        await client.chat.completions.create(model="any", messages=[{"role": "user", "content": "bye"}])
    except openai.BadRequestError as e:
        return 1.0 if "must extend this rollout's conversation" in str(e) else -1.0
    return -2.0


def test_the_openai_client_against_the_endpoint(qtok):
    """Real ``openai.AsyncOpenAI`` clients over 127.0.0.1, a fake engine: 2 prompts x 3 rollouts of a
    two-turn agent, batched into the engine; faulty agents end only their trajectory."""
    d, engine = TemplateDelta(qtok), FakeEngine(qtok)
    items = [item(qtok, 0), item(qtok, 1, "Water is")]
    batch, stats, batcher = asyncio.run(run_agent_rollouts(items, 3, engine, two_turns, d, LIMITS,
                                                           {"letter": "a"}, seed=1, window_s=0.05))
    assert len(batch) == 6 and list(batch.prompt_index) == [0, 0, 0, 1, 1, 1]
    assert batch.turn_count.tolist() == [2] * 6 and set(batch.finish_reason) == {"stop"}
    assert max(batcher.batch_sizes) > 1 and len(engine.calls) < 12  # concurrent rollouts share engine calls
    assert stats.turns == 12 and stats.errors == 0 and stats.observation_tokens == int((batch.loss_mask == 0).sum())
    # the first engine call holds first turns (which rollout comes first is up to the event loop)
    prompts = {tuple(batch.prompt_ids[batch.prompt_offsets[i]: batch.prompt_offsets[i + 1]]) for i in range(6)}
    assert all(r.max_tokens == 6 and tuple(r.prompt_ids) in prompts for r in engine.calls[0])
    assert float(batch.token_reward.sum()) == pytest.approx(stats.reward_sum) and stats.reward_sum > 0

    async def run(agent, timeout_s=5.0):
        limits = TrajectoryLimits(8, 3, 200, timeout_s)
        return await run_agent_rollouts(items[:1], 2, FakeEngine(qtok), agent, d, limits)

    for agent, finish in ((raises, "env_error"), (hangs, "env_error"), (edits_history, "stop")):
        batch, stats, _ = asyncio.run(run(agent, 0.5 if agent is hangs else 5.0))
        assert set(batch.finish_reason) == {finish}, agent.__name__
        assert stats.errors == (2 if finish == "env_error" else 0)
        if agent is hangs:  # no completion: the dataset's prompt, an empty response
            assert batch.response_lengths.tolist() == [0, 0]
    assert batch.token_reward.sum() == 2.0  # edits_history saw the 400 with its message


def test_agent_loading_errors_name_the_key():
    with pytest.raises(UserError, match="env.agent=no_such_module:rollout: cannot import module"):
        load_agent("no_such_module:rollout")
    with pytest.raises(UserError, match="expected 'module:function'"):
        load_agent("rollout")
    with pytest.raises(UserError, match="not an async function"):
        load_agent("ray_rlhf.envs.letters:letter_share")
    with pytest.raises(UserError, match="cannot be called as rollout"):
        load_agent(f"{__name__}:raises", {"letter": "a"})
    assert load_agent(f"{__name__}:two_turns", {"letter": "a"}) is two_turns


def test_the_bundled_letter_agent_through_the_endpoint(qtok):
    """``env.agent=ray_rlhf.envs.openai_agents:letter_rollout``: two completions per rollout, the
    reward is the mean share of the named letters in the replies."""
    from ray_rlhf.envs.openai_agents import letter_rollout

    engine = FakeEngine(qtok, reply=" eee aaa")
    batch, stats, _ = asyncio.run(run_agent_rollouts([item(qtok)], 2, engine, letter_rollout, TemplateDelta(qtok),
                                                     LIMITS, {"letters": "e"}))
    assert batch.turn_count.tolist() == [2, 2] and stats.errors == 0
    reply = engine.tok.decode(engine.tok(" eee aaa", add_special_tokens=False)["input_ids"])
    assert stats.reward_sum == pytest.approx(2 * reply.count("e") / len(reply))


def test_an_engine_failure_fails_the_shard_not_the_agents(qtok):
    def broken(requests):
        raise RuntimeError("engine broke")

    with pytest.raises(RuntimeError, match="engine broke"):
        asyncio.run(run_agent_rollouts([item(qtok)], 2, broken, two_turns, TemplateDelta(qtok), LIMITS))


ADD = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}]


async def calculator(client, row):
    """OpenAI function calling: the model calls ``add``, the agent runs it, the model answers."""
    import json

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    r = await client.chat.completions.create(model="any", messages=messages, tools=ADD)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    result = sum(json.loads(call.function.arguments).values())
    messages += [r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": str(result)}]
    r2 = await client.chat.completions.create(model="any", messages=messages, tools=ADD)
    return float("5" in (r2.choices[0].message.content or ""))


def test_tool_calls_through_the_openai_client(qtok):
    """A completion holding a Hermes ``<tool_call>`` comes back as OpenAI ``tool_calls``; the agent's
    ``tool`` message is appended as the template's delta; the ids stay as sampled."""

    class Calls(FakeEngine):
        def __call__(self, requests):
            self.reply = ('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' if not self.calls
                          else " 5")
            return super().__call__(requests)

    engine = Calls(qtok)
    d = TemplateDelta(qtok)
    limits = TrajectoryLimits(max_new_tokens=64, max_turns=3, max_total_tokens=400, step_timeout_s=5.0)
    batch, stats, _ = asyncio.run(run_agent_rollouts([item(qtok)], 1, engine, calculator, d, limits, window_s=0.05))
    assert batch.finish_reason.tolist() == ["stop"] and stats.reward_sum == 1.0 and batch.turn_count.tolist() == [2]
    (first,), (second,) = engine.calls
    call_ids = qtok('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>',
                    add_special_tokens=False)["input_ids"]
    _, obs = TemplateDelta(qtok, ADD).delta_ids("assistant", [{"role": "tool", "tool_call_id": "call_0_0",
                                                                "content": "5"}])
    assert second.prompt_ids == first.prompt_ids + call_ids + obs  # the call's ids as sampled, then the result



def test_an_environment_and_an_agent_exclude_each_other():
    from ray_rlhf.config import RunConfig

    with pytest.raises(ValueError, match="are both set"):
        RunConfig(env={"name": "ray_rlhf.envs.letters:LetterGame", "agent": "my_agents:rollout"})
    assert RunConfig(env={"agent": "my_agents:rollout"}).env.multi_turn
