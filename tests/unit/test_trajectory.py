"""Multi-turn trajectories (:mod:`ray_rlhf.generation.trajectory`) with a fake sampler: the
assembly of ids, loss mask, log-probs and per-turn rewards, the limits and finish reasons, and
environments that raise, hang or answer in the wrong shape. No vLLM: the assembly does not need it
(tests/integration/test_multiturn_generator.py runs the same code on the real engine)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from ray_rlhf.envs.base import StepResult
from ray_rlhf.envs.letters import LetterGame
from ray_rlhf.errors import UserError
from ray_rlhf.generation.trajectory import Sampled, TemplateDelta, TrajectoryLimits, run_trajectories
from ray_rlhf.records import PromptItem
from ray_rlhf.rewards.rules import letter_frequency

QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from ray_rlhf.models.factory import train_tokenizer

    return train_tokenizer(512)


class FakeSampler:
    """Answers every request with the ids of the next reply of ``replies`` (cycling), log-prob
    -0.25 - 0.01 * position, finish ``stop``; cut at ``max_tokens`` with finish ``length``. Records
    every request."""

    def __init__(self, tok, replies=(" eee", " aaa bb", " ooo")):
        self.tok, self.replies, self.calls = tok, list(replies), []

    def __call__(self, requests):
        self.calls.append(requests)
        out = []
        for k, r in enumerate(requests):
            text = self.replies[(len(self.calls) - 1 + k) % len(self.replies)]
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            finish = "stop"
            if len(ids) > r.max_tokens:
                ids, finish = ids[: r.max_tokens], "length"
            out.append(Sampled(ids, [-0.25 - 0.01 * i for i in range(len(ids))], finish, self.tok.decode(ids)))
        return out


def items(tok, texts=("The cat sat on", "Water is")):
    return [PromptItem(i, t, tuple(tok(t)["input_ids"]), {"answer": f"a{i}"}) for i, t in enumerate(texts)]


LIMITS = TrajectoryLimits(max_new_tokens=8, max_turns=4, max_total_tokens=120, step_timeout_s=5.0)


def rows(batch):
    """Per row: (prompt ids, response ids, mask, logprobs, token rewards)."""
    p, r = batch.prompt_offsets, batch.response_offsets
    for i in range(len(batch)):
        sl = slice(r[i], r[i + 1])
        yield (batch.prompt_ids[p[i]:p[i + 1]].tolist(), batch.response_ids[sl].tolist(), batch.loss_mask[sl].tolist(),
               batch.sampler_logprobs[sl].tolist(), batch.token_reward[sl].tolist())


@pytest.mark.parametrize("template", [None, QWEN_LIKE])
def test_incremental_rendering_equals_the_whole_conversation(tok, template):
    """Prompt rendered once + each model turn's text + each observation's delta == the template
    applied to the whole conversation at once (text), and the assembled ids decode to it."""
    if template is not None:
        tok = tok.__class__.from_pretrained(tok.name_or_path) if tok.name_or_path else tok
        tok.chat_template = template
    d = TemplateDelta(tok)
    turns = [(" hello there", "Use the letter a."), (" an apple", [{"role": "tool", "content": "42"}]),
             (" done", None)]
    msgs = [{"role": "user", "content": "Play a game."}]
    text = d.render(msgs, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for reply, obs in turns:
        text += reply
        ids += tok(reply, add_special_tokens=False)["input_ids"]  # stands for the sampled ids
        msgs.append({"role": "assistant", "content": reply.lstrip() if template is None else reply})
        if obs is None:
            break
        new = [{"role": "user", "content": obs}] if isinstance(obs, str) else obs
        msgs += new
        delta_text, delta_ids = d.delta_ids("assistant", new)
        text += delta_text
        ids += delta_ids
    whole = d.render(msgs, add_generation_prompt=False)
    # The tiny template renders an assistant message as "assistant: <content>" while its generation
    # prompt is "assistant:": the model samples the space (the replies above start with one).
    # ... and the whole rendering ends with the last turn's closing text (what the model's EOS stands for)
    assert whole == text + ("\n" if template is None else "<|im_end|>\n")
    assert tok.decode(ids) == text


def test_letter_game_trajectories_assemble_sampled_and_observation_ids(tok):
    sampler = FakeSampler(tok)
    d = TemplateDelta(tok)
    batch, stats = run_trajectories(items(tok), 2, sampler, lambda: LetterGame(turns=2), d, LIMITS, seed=3,
                                    policy_version=5, generator_id="g")
    assert len(batch) == 4 and batch.prompt_index.tolist() == [0, 0, 1, 1] and batch.sample_index.tolist() == [0, 1] * 2
    assert batch.finish_reason.tolist() == ["stop"] * 4 and not batch.truncated.any()
    assert batch.turn_count.tolist() == [2] * 4 and batch.columns["answer"] == ["a0", "a0", "a1", "a1"]
    assert len(sampler.calls) == 2 and [len(c) for c in sampler.calls] == [4, 4]  # one engine call per turn
    for k, (pids, rids, mask, lps, rew) in enumerate(rows(batch)):
        item = items(tok)[k // 2]
        game = LetterGame(turns=2)
        first = game.reset({"answer": item.columns["answer"], "prompt_index": item.index})
        _, first_ids = d.delta_ids("user", [{"role": "user", "content": first}])
        assert pids == list(item.prompt_ids) + first_ids  # the reset observation ends the prompt
        # turn 1 request: the prompt; turn 2 request: prompt + turn 1 + observation
        req1, req2 = sampler.calls[0][k], sampler.calls[1][k]
        assert req1.prompt_ids == pids
        s1 = tok(sampler.replies[k % 3], add_special_tokens=False)["input_ids"]  # call 0's reply to row k
        assert rids[: len(s1)] == s1  # the sampled ids, as sampled
        step1 = game.step(tok.decode(s1))
        _, obs_ids = d.delta_ids("assistant", [{"role": "user", "content": step1.observation}])
        assert rids[len(s1): len(s1) + len(obs_ids)] == obs_ids
        s2 = rids[len(s1) + len(obs_ids):]
        assert req2.prompt_ids == pids + s1 + obs_ids
        assert mask == [1] * len(s1) + [0] * len(obs_ids) + [1] * len(s2)
        assert lps[: len(s1)] == pytest.approx([-0.25 - 0.01 * i for i in range(len(s1))])
        assert lps[len(s1): len(s1) + len(obs_ids)] == [0.0] * len(obs_ids)
        step2 = game.step(tok.decode(s2))
        expect = [0.0] * len(rids)
        expect[len(s1) - 1] = step1.reward
        expect[-1] = step2.reward
        assert rew == pytest.approx(expect)
        assert step1.reward == pytest.approx(letter_frequency("", tok.decode(s1), letter=step1.info["letter"]))
    assert stats.trajectories == 4 and stats.turns == 8 and stats.errors == 0
    assert stats.observation_tokens == int((batch.loss_mask == 0).sum())
    assert stats.reward_sum == pytest.approx(float(batch.token_reward.sum()))
    assert batch.policy_version.tolist() == [5] * 4 and set(batch.generator_id) == {"g"}


def test_limits_end_trajectories_with_their_reason(tok):
    d = TemplateDelta(tok)
    b, _ = run_trajectories(items(tok), 1, FakeSampler(tok), lambda: LetterGame(turns=9), d,
                            TrajectoryLimits(8, 3, 400, 5.0))
    assert b.finish_reason.tolist() == ["max_turns"] * 2 and b.turn_count.tolist() == [3, 3]
    b, _ = run_trajectories(items(tok), 1, FakeSampler(tok, [" abcdefghijklmnopqrstuvwxyz"]),
                            lambda: LetterGame(turns=2), d, TrajectoryLimits(4, 2, 120, 5.0))
    assert b.finish_reason.tolist() == ["length"] * 2  # the game is done, but its last turn was cut
    short = TrajectoryLimits(max_new_tokens=8, max_turns=9, max_total_tokens=70, step_timeout_s=5.0)
    b, _ = run_trajectories(items(tok), 1, FakeSampler(tok), lambda: LetterGame(turns=9), d, short)
    assert b.finish_reason.tolist() == ["max_total_tokens"] * 2 and b.truncated.all()
    assert (b.prompt_lengths + b.response_lengths <= 70).all()
    assert b.loss_mask[b.response_offsets[1:] - 1].tolist() == [1, 1]  # never ends on an observation


class Raises(LetterGame):
    def step(self, action):
        raise RuntimeError("sandbox crashed")


class Hangs(LetterGame):
    def step(self, action):
        time.sleep(3)
        return super().step(action)


class AsyncGame(LetterGame):
    async def reset(self, row):
        await asyncio.sleep(0)
        return LetterGame.reset(self, row)

    async def step(self, action):
        await asyncio.sleep(0.01)
        return LetterGame.step(self, action)


class ResetFails(LetterGame):
    def reset(self, row):
        raise KeyError("no such task")


class WrongShape(LetterGame):
    def step(self, action):
        return "ok", 1.0


def test_faulty_environments_end_only_their_trajectory(tok, caplog):
    d = TemplateDelta(tok)
    n = iter(range(100))
    envs = {0: Raises, 1: Hangs, 2: AsyncGame, 3: ResetFails}
    t0 = time.perf_counter()
    b, stats = run_trajectories(items(tok, ("a b", "c d", "e f", "g h")), 1, FakeSampler(tok),
                                lambda: envs[next(n)](turns=2), d, TrajectoryLimits(8, 4, 120, 0.3))
    assert time.perf_counter() - t0 < 2.5  # the hung step was not waited for
    assert b.finish_reason.tolist() == ["env_error", "env_error", "stop", "env_error"]
    assert b.turn_count.tolist() == [1, 1, 2, 1] and stats.errors == 3
    assert "sandbox crashed" in caplog.text and "env.step_timeout_s=0.3" in caplog.text and "no such task" in caplog.text


def test_a_step_of_the_wrong_shape_is_a_user_error_naming_the_class(tok):
    with pytest.raises(UserError, match=r"test_trajectory:WrongShape.step returned a tuple of 2"):
        run_trajectories(items(tok), 1, FakeSampler(tok), lambda: WrongShape(), TemplateDelta(tok), LIMITS)


def test_step_result_tuple_and_dataclass_agree(tok):
    class TupleGame(LetterGame):
        def step(self, action):
            r = LetterGame.step(self, action)
            return r.observation, r.reward, r.done, r.info

    d = TemplateDelta(tok)
    a, _ = run_trajectories(items(tok), 2, FakeSampler(tok), lambda: LetterGame(), d, LIMITS, seed=1)
    b, _ = run_trajectories(items(tok), 2, FakeSampler(tok), lambda: TupleGame(), d, LIMITS, seed=1)
    assert np.array_equal(a.response_ids, b.response_ids) and np.array_equal(a.token_reward, b.token_reward)
    assert isinstance(LetterGame().step("e"), StepResult)


@pytest.mark.parametrize("template", [None, QWEN_LIKE])
def test_the_first_observation_joins_a_templated_prompt_as_the_whole_conversation_renders(tok, template):
    """A chat prompt (rendered with the generation prompt) plus the reset observation equals the
    template applied to [user prompt, user observation] -- the opened assistant turn is not left
    dangling before the observation. A plain-text prompt gets the delta appended."""
    tok = tok.__class__.from_pretrained(tok.name_or_path) if template is not None and tok.name_or_path else tok
    if template is not None:
        tok.chat_template = template
    d = TemplateDelta(tok)
    msgs = [{"role": "user", "content": "Play."}]
    text = d.render(msgs, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    obs = [{"role": "user", "content": "Use the letter e."}]
    new_ids, new_text = d.after_prompt(ids, text, obs)
    assert new_text == d.render(msgs + obs, add_generation_prompt=True)
    assert tok.decode(new_ids) == new_text
    plain_ids, plain_text = d.after_prompt(tok("Once upon")["input_ids"], "Once upon", obs)
    assert plain_text == "Once upon" + d.delta_text("user", obs)


def test_a_multi_turn_shard_deadline_covers_every_turn_and_env_call():
    """4 * s/token * (prompts * n * max_new_tokens * turns) + (turns + 1) * env timeout, floor 60 s."""
    from ray_rlhf.generation.pool import GeneratorPool
    from ray_rlhf.records import PromptShard, SamplingSpec

    pool = GeneratorPool.__new__(GeneratorPool)  # the deadline arithmetic only: no actors
    pool.shard_timeout_s, pool.shard_timeout_floor_s, pool.seconds_per_token = None, 60.0, 0.01
    shard, spec = PromptShard(0, tuple(PromptItem(i, "p", (1,)) for i in range(4))), SamplingSpec(n=4, max_new_tokens=25)
    pool.turns_per_sample, pool.env_timeout_s = 1, 0.0
    assert pool.shard_deadline_s(shard, spec) == 60.0  # 4 * 0.01 * 400 = 16 s < the floor
    pool.turns_per_sample, pool.env_timeout_s = 5, 2.0
    assert pool.shard_deadline_s(shard, spec) == pytest.approx(4 * 0.01 * 2000 + 6 * 2.0)  # 80 + 12
