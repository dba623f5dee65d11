"""Multi-turn rollouts on the real in-process vLLM engine (tiny random Llama, no Ray): token in,
token out, checked for every trajectory.

One engine and one shard for the module (a few seconds): every engine call is recorded (what went
in, what was sampled), and the rows the generator assembled are checked against them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_rlhf.envs.letters import LetterGame
from ray_rlhf.generation.trajectory import TemplateDelta, turn_seed
from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec

pytestmark = pytest.mark.integration

PROMPTS = ("The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog")
ENV = dict(name="ray_rlhf.envs.letters:LetterGame", kwargs={"turns": 3}, max_turns=3, step_timeout_s=10.0,
           max_total_tokens=150)


@pytest.fixture(scope="module")
def run(tiny_policy_path):
    """(generator, tokenizer, report, batch, recorded engine calls) of one shard of 4 prompts x 3."""
    from ray_rlhf.generation.generator import Generator

    gen = Generator(Path(tiny_policy_path), "mt-test", max_model_len=192, seed=0, kv_cache_gib=1, env=ENV)
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
