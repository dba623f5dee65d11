"""Multi-turn rollouts on the real in-process vLLM engine (tiny random Llama): token in, token out,
checked for every trajectory.

One engine and one shard for the module (a few seconds): every engine call is recorded (what went
in, what was sampled), and the rows the generator assembled are checked against them. The same
engine then runs an OpenAI-client agent, environments in Ray actors of their own (``env.num_cpus``;
a local Ray started for those tests only) and a tool environment whose calls vLLM's structured
outputs force.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ray_rlhf.envs.base import load_env_class
from ray_rlhf.envs.letters import LetterGame
from ray_rlhf.generation.trajectory import TemplateDelta, turn_seed
from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec
from tests.integration.multiturn_common import ENV, PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tiny_policy_path):
    """(generator, tokenizer, report, batch, recorded engine calls) of one shard of 4 prompts x 3."""
    from ray_rlhf.generation.generator import Generator

    gen = Generator(Path(tiny_policy_path), "mt-test", max_model_len=512, seed=0, kv_cache_gib=1, env=ENV)
    calls = []
    generate = gen._llm.generate

    def recording(prompts, params, **kw):
        outs = generate(prompts, params, **kw)
        calls.append([(list(p["prompt_token_ids"]), list(o.outputs[0].token_ids), list(o.outputs[0].logprobs.logprobs),
                       sp.seed, o.outputs[0].text) for p, o, sp in zip(prompts, outs, params)])
        return outs

    gen._llm.generate = recording
    tok = gen._llm.get_tokenizer()
    items = tuple(PromptItem(i, t, tuple(tok(t).input_ids), {"answer": str(i)}) for i, t in enumerate(PROMPTS))
    report, batch = gen.generate(PromptShard(0, items), SamplingSpec(n=3, max_new_tokens=12, seed=7))
    yield gen, tok, report, batch, calls
    gen.shutdown()


def test_every_trajectory_is_prompt_plus_sampled_and_observation_ids(run):
    gen, tok, report, batch, calls = run
    delta = TemplateDelta(tok)
    requests = {(tuple(ids), seed): (out, lps, text) for call in calls for ids, out, lps, seed, text in call}
    assert len(batch) == 12 and len(calls) >= 2  # one engine call per turn, all trajectories together
    p_off, r_off = batch.prompt_offsets, batch.response_offsets
    for i in range(len(batch)):
        item = PromptItem(int(batch.prompt_index[i]), "", ())
        game = LetterGame(turns=3)
        first = game.reset({"answer": str(item.index), "prompt_index": item.index})
        _, first_ids = delta.delta_ids("user", [{"role": "user", "content": first}])
        prompt = batch.prompt_ids[p_off[i]:p_off[i + 1]].tolist()
        assert prompt == list(tok(PROMPTS[item.index]).input_ids) + first_ids
        ids = batch.response_ids[r_off[i]:r_off[i + 1]].tolist()
        mask = batch.loss_mask[r_off[i]:r_off[i + 1]].tolist()
        lps = batch.sampler_logprobs[r_off[i]:r_off[i + 1]].tolist()
        rewards = batch.token_reward[r_off[i]:r_off[i + 1]].tolist()
        # Rebuild the row from what the engine was given and sampled, and the env's answers.
        expect, expect_mask, expect_lps, expect_rew, turns = [], [], [], [], 0
        while True:
            seed = turn_seed(7, item.index, int(batch.sample_index[i]), turns)
            sampled, sampled_lps, text = requests[(tuple(prompt + expect), seed)]  # token in: the exact ids so far
            expect += sampled
            expect_mask += [1] * len(sampled)
            expect_lps += sampled_lps
            turns += 1
            step = game.step(text)  # the env reads the engine's text; the ids stay as sampled
            expect_rew += [0.0] * (len(sampled) - 1) + [step.reward]
            if step.done or turns == 3:
                break
            _, obs = delta.delta_ids("assistant", [{"role": "user", "content": step.observation}],
                                     ended_on_eos=sampled[-1] == tok.eos_token_id)
            if len(prompt) + len(expect) + len(obs) >= 150:
                break
            expect += obs
            expect_mask += [0] * len(obs)
            expect_lps += [0.0] * len(obs)
            expect_rew += [0.0] * len(obs)
        assert ids == expect, f"row {i}: assembled ids differ from prompt + sampled + observation ids"
        assert mask == expect_mask  # the loss mask covers exactly the sampled tokens
        assert lps == pytest.approx(expect_lps)  # a behaviour log-prob for every sampled token
        assert all(lp < 0 for lp, m in zip(lps, mask) if m) and rewards == pytest.approx(expect_rew)
        assert batch.finish_reason[i] in ("stop", "length", "max_total_tokens")
    assert batch.turn_count.tolist() == [3] * 12 or batch.truncated.any()
    assert report.tokens == int(batch.loss_mask.sum()) and report.env["trajectories"] == 12
    assert report.env["observation_tokens"] == int((batch.loss_mask == 0).sum())
    assert report.env["reward_sum"] == pytest.approx(float(batch.token_reward.sum()), abs=1e-4)
    assert (batch.prompt_lengths + batch.response_lengths <= 150).all()


TRANSCRIPTS: dict[tuple[int, str], list] = {}
"""(prompt index, the rollout's base_url) -> what the agent sent and got back, for the checks."""


async def two_turn_agent(client, row):
    """An agent written against the OpenAI client, unaware of training."""
    messages = [{"role": "system", "content": "You answer in short sentences."},
                {"role": "user", "content": row["prompt"]}]
    first = await client.chat.completions.create(model="policy", messages=messages, max_tokens=10)
    messages += [first.choices[0].message, {"role": "user", "content": "Say it again with more e."}]
    second = await client.chat.completions.create(model="policy", messages=messages, stop=["zzz"])
    TRANSCRIPTS[(row["prompt_index"], str(client.base_url))] = [first, second]
    text = second.choices[0].message.content or ""
    return text.count("e") / max(len(text), 1)


def test_an_openai_client_agent_on_the_real_engine(run):
    """``env.agent``: rollouts of an agent using ``openai.AsyncOpenAI`` against the generator's
    endpoint on 127.0.0.1. Every row is the first request rendered once + exactly the ids the engine
    sampled + the template delta of the new message; the mask covers the sampled ids; a log-prob per
    sampled id; the pieces add up to the whole conversation rendered at once."""
    gen, tok, _, _, calls = run
    calls.clear()
    gen._agent, env_cls, env = two_turn_agent, gen._env_cls, gen.env
    gen._env_cls, gen.env = None, {**env, "kwargs": {}}
    try:
        report, batch = gen.generate(PromptShard(1, tuple(PromptItem(i, t, tuple(tok(t).input_ids), {"answer": "x"})
                                                           for i, t in enumerate(PROMPTS[:2]))),
                                     SamplingSpec(n=3, max_new_tokens=12, seed=7))
    finally:
        gen._agent, gen._env_cls, gen.env = None, env_cls, env
    delta = TemplateDelta(tok)
    sampled = {(tuple(ids), seed): (out, lps) for call in calls for ids, out, lps, seed, _ in call}
    assert len(batch) == 6 and len(TRANSCRIPTS) == 6 and len(calls) < 12  # concurrent rollouts share engine calls
    assert set(batch.finish_reason.tolist()) <= {"stop", "length"} and (batch.turn_count == 2).all()
    p_off, r_off = batch.prompt_offsets, batch.response_offsets
    for i in range(len(batch)):
        prompt = batch.prompt_ids[p_off[i]:p_off[i + 1]].tolist()
        ids = batch.response_ids[r_off[i]:r_off[i + 1]].tolist()
        mask = batch.loss_mask[r_off[i]:r_off[i + 1]].tolist()
        lps = batch.sampler_logprobs[r_off[i]:r_off[i + 1]].tolist()
        messages = [{"role": "system", "content": "You answer in short sentences."},
                    {"role": "user", "content": PROMPTS[int(batch.prompt_index[i])]}]
        text0 = delta.render(messages, add_generation_prompt=True)
        assert prompt == tok(text0, add_special_tokens=delta.template is not None)["input_ids"]
        index, sample = int(batch.prompt_index[i]), int(batch.sample_index[i])
        out1, lps1 = sampled[(tuple(prompt), turn_seed(7, index, sample, 0))]  # token in: exactly these ids
        _, obs = delta.delta_ids("assistant", [{"role": "user", "content": "Say it again with more e."}],
                                 ended_on_eos=out1[-1] == tok.eos_token_id)
        out2, lps2 = sampled[(tuple(prompt + out1 + obs), turn_seed(7, index, sample, 1))]
        assert ids == out1 + obs + out2, f"row {i}: assembled ids differ from sampled + observation ids"
        assert mask == [1] * len(out1) + [0] * len(obs) + [1] * len(out2)
        assert lps == pytest.approx(lps1 + [0.0] * len(obs) + lps2) and all(lp < 0 for lp in lps1 + lps2)
        assert batch.token_reward[r_off[i]:r_off[i + 1]][:-1].sum() == 0  # the reward on the last token only
        assert len(out1) <= 10  # the request's max_tokens
    # rendered incrementally == the whole conversation rendered at once (text), for every rollout
    for (index, _), (first, second) in TRANSCRIPTS.items():
        c1, c2 = first.choices[0].message.content, second.choices[0].message.content
        row = next(i for i in range(len(batch)) if int(batch.prompt_index[i]) == index
                   and batch.response[i].startswith(c1) and batch.response[i].endswith(c2))
        whole = delta.render([{"role": "system", "content": "You answer in short sentences."},
                              {"role": "user", "content": PROMPTS[index]}, {"role": "assistant", "content": c1},
                              {"role": "user", "content": "Say it again with more e."},
                              {"role": "assistant", "content": c2}], add_generation_prompt=False)
        # The tiny template renders an assistant message as "assistant: <content>" while its generation
        # prompt is "assistant:" (the model samples a space, or not): that one space aside, the same text.
        assert whole.replace("assistant: ", "assistant:") == batch.prompt[row] + batch.response[row] + "\n"
        assert first.usage.prompt_tokens == len(batch.prompt_ids[p_off[row]:p_off[row + 1]])
    assert report.env["trajectories"] == 6 and report.env["turns"] == 12 and report.env["errors"] == 0


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the environment actors (``env.num_cpus``); the engine stays in this process."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _with_env(gen, tok, env: dict, prompts=PROMPTS, n: int = 3, shard_id: int = 2):
    """One shard generated with ``gen.env`` set to ``env`` (restored after)."""
    old, old_cls = gen.env, gen._env_cls
    gen.env = env
    gen._env_cls = load_env_class(env["name"])
    try:
        items = tuple(PromptItem(i, t, tuple(tok(t).input_ids), {"answer": str(i)}) for i, t in enumerate(prompts))
        return gen.generate(PromptShard(shard_id, items), SamplingSpec(n=n, max_new_tokens=12, seed=7))
    finally:
        gen.env, gen._env_cls = old, old_cls


def test_environments_in_actors_of_their_own_equal_in_process(run, local_ray):
    """``env.num_cpus=0.1``: the same LetterGame trajectories as in the generator's process (same
    seeds, same engine), the environments living in two env-host actors."""
    gen, tok, report, batch, _ = run
    report2, batch2 = _with_env(gen, tok, {**ENV, "num_cpus": 0.1, "num_actors": 2})
    pool = gen._env_makers.pool
    assert pool is not None and pool.started == 2 and all(h is not None for h in pool.hosts)
    for name in ("prompt_ids", "response_ids", "loss_mask", "token_reward", "sampler_logprobs", "finish_reason"):
        assert getattr(batch2, name).tolist() == getattr(batch, name).tolist(), name
    assert report2.env["errors"] == 0 and report2.env["turns"] == report.env["turns"]
    # the shard's instances are dropped when it ends: ``release`` sends the drops without waiting,
    # and Ray orders no calls of two callers, so this process asks until the hosts have seen them
    deadline = time.monotonic() + 30
    while (held := local_ray.get([h.close.remote([]) for h in pool.hosts])) != [0, 0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held == [0, 0]


def test_a_dead_environment_actor_ends_only_its_trajectories(run, local_ray, tmp_path, caplog):
    """The host that runs the first ``step`` dies (``os._exit``): its trajectories (every other one,
    round robin over two hosts) end with ``env_error``, the others complete; the pool starts a new
    host for the next shard."""
    gen, tok, _, _, _ = run
    env = {**ENV, "name": "tests.integration.dying_env:LetterGameDiesOnce",
           "kwargs": {"turns": 3, "marker": str(tmp_path / "died")}, "num_cpus": 0.1, "num_actors": 2}
    with caplog.at_level("WARNING", logger="ray_rlhf.generation.trajectory"):
        report, batch = _with_env(gen, tok, env, shard_id=3)
    assert "environment LetterGameDiesOnce failed at turn 1" in caplog.text and "Actor" in caplog.text
    errors = [i for i, r in enumerate(batch.finish_reason.tolist()) if r == "env_error"]
    assert (tmp_path / "died").exists() and len(errors) == 6 and len({i % 2 for i in errors}) == 1
    assert report.env["errors"] == 6 and all(batch.turn_count[i] == 1 for i in errors)
    others = [r for i, r in enumerate(batch.finish_reason.tolist()) if i not in errors]
    assert set(others) <= {"stop", "length", "max_total_tokens"}
    pool = gen._env_makers.pool
    assert pool.hosts.count(None) == 1  # the dead host is forgotten...
    report, batch = _with_env(gen, tok, env, prompts=PROMPTS[:1], n=2, shard_id=4)
    assert pool.started == 3 and report.env["errors"] == 0  # ...and replaced for the next shard


QWEN_WITH_TOOLS = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL_REGEX = r'<tool_call>\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}</tool_call>'
ANSWER_REGEX = r"The sum is [0-9]{1,2}\."


def test_a_tool_call_sampled_by_the_real_engine(run):
    """A ToolEnv on the real engine, its turns forced by vLLM's structured outputs (a regex; the
    random tiny model would not write a call by itself): turn 1 a well-formed Hermes call with
    sampled arguments, turn 2 an answer. The prompt is rendered with ``tools=``; the call is parsed
    and run, its result appended as the template's ``tool`` delta after the call's ids as sampled,
    the answer rewarded by what the tool returned."""
    import re

    from transformers import AutoTokenizer
    from vllm.sampling_params import StructuredOutputsParams

    from ray_rlhf.data.prompts import tokenize_prompts
    from ray_rlhf.envs.base import env_tools

    gen, _, _, _, _ = run
    env = {**ENV, "name": "tests.integration.adder_env:Adder", "kwargs": {}, "max_turns": 3, "max_total_tokens": 500}
    tools = env_tools(env["name"])
    tok = AutoTokenizer.from_pretrained(gen._llm.llm_engine.model_config.tokenizer)  # the engine's, with
    tok.chat_template = QWEN_WITH_TOOLS  # a Qwen-like template that lists tools (the tiny one does not)
    generate, get_tokenizer = gen._llm.generate, gen._llm.get_tokenizer
    firsts: set[tuple[int, ...]] = set()

    def forced(prompts, params, **kw):  # the engine call, with each request's turn forced by a regex
        for p, sp in zip(prompts, params):
            first = tuple(p["prompt_token_ids"]) in firsts
            sp.structured_outputs = StructuredOutputsParams(regex=CALL_REGEX if first else ANSWER_REGEX)
        return generate(prompts, params, **kw)

    try:
        items = tuple(tokenize_prompts([[{"role": "user", "content": f"{q}?"}] for q in ("2+3", "4+4")], tok, 400,
                                       tools=tools))
        firsts.update(it.prompt_ids for it in items)
        gen._llm.generate, gen._llm.get_tokenizer = forced, lambda: tok
        old, old_cls = gen.env, gen._env_cls
        gen.env, gen._env_cls = env, load_env_class(env["name"])
        report, batch = gen.generate(PromptShard(5, items), SamplingSpec(n=2, max_new_tokens=96, seed=11))
        delta = TemplateDelta(tok, tools)
    finally:
        gen._llm.generate, gen._llm.get_tokenizer = generate, get_tokenizer
        gen.env, gen._env_cls = old, old_cls
    assert all('"name": "add"' in it.text for it in items), items[0].text  # the model was shown the tool
    assert report.env["tool_calls"] == 4 and report.env["tool_errors"] == 0 and report.env["errors"] == 0
    assert batch.finish_reason.tolist() == ["stop"] * 4 and batch.turn_count.tolist() == [2] * 4
    r_off = batch.response_offsets
    for i in range(len(batch)):
        ids = batch.response_ids[r_off[i]:r_off[i + 1]].tolist()
        mask = batch.loss_mask[r_off[i]:r_off[i + 1]].tolist()
        n1 = mask.index(0)  # turn 1: the call's ids as sampled (its EOS included)
        call = tok.decode(ids[:n1], skip_special_tokens=True)
        a, b = map(int, re.fullmatch(r'<tool_call>\{"name": "add", "arguments": \{"a": (\d), "b": (\d)\}\}</tool_call>',
                                     call).groups())
        _, obs = delta.delta_ids("assistant", [{"role": "tool", "content": str(a + b)}],
                                 ended_on_eos=ids[n1 - 1] == tok.eos_token_id)
        assert ids[n1:n1 + len(obs)] == obs and mask == [1] * n1 + [0] * len(obs) + [1] * (len(ids) - n1 - len(obs))
        answer = tok.decode(ids[n1 + len(obs):], skip_special_tokens=True)
        assert re.fullmatch(ANSWER_REGEX, answer)
        expect = float(str(a + b) in answer)
        assert batch.token_reward[r_off[i]:r_off[i + 1]].tolist() == [0.0] * (len(ids) - 1) + [expect]


def test_a_hung_step_in_an_environment_actor_times_out(run, local_ray):
    """``env.step_timeout_s`` holds for environments in actors: a ``step`` that hangs (prompt 0) ends
    its trajectories with ``env_error``; the others, in the same actor, complete."""
    gen, tok, _, _, _ = run
    env = {**ENV, "name": "tests.integration.hanging_env:LetterGameHangs", "step_timeout_s": 1.5,
           "num_cpus": 0.1, "num_actors": 1}
    report, batch = _with_env(gen, tok, env, n=1, shard_id=6)
    reasons = batch.finish_reason.tolist()
    assert reasons[0] == "env_error" and report.env["errors"] == 1
    assert set(reasons[1:]) <= {"stop", "length", "max_total_tokens"}
