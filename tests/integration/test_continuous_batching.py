"""``env.scheduling=continuous`` on the real in-process vLLM engine (tiny random Llama, no Ray).

One engine for the module. The continuous schedule gives exactly the turn-synchronous schedule's
trajectories (same per-turn seeds; the turn-synchronous rows are checked token by token against the
engine's calls in ``test_multiturn_generator.py``), and with an environment that sleeps 50-200 ms
per step it keeps the engine busier and finishes sooner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec
from tests.integration.multiturn_common import ENV, PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gen(tiny_policy_path):
    from ray_rlhf.generation.generator import Generator

    g = Generator(Path(tiny_policy_path), "cb-test", max_model_len=192, seed=0, kv_cache_gib=1, env=ENV)
    yield g
    g.shutdown()


def _shard(gen, k: int = 4) -> PromptShard:
    tok = gen._llm.get_tokenizer()
    return PromptShard(0, tuple(PromptItem(i, t, tuple(tok(t).input_ids), {"answer": str(i)})
                                for i, t in enumerate(PROMPTS[:k])))


def _run(gen, scheduling: str, env: dict | None = None, n: int = 3, tokens: int = 12):
    from ray_rlhf.envs.base import load_env_class

    gen.env = {**ENV, **(env or {}), "scheduling": scheduling}
    gen._env_cls = load_env_class(gen.env["name"])
    return gen.generate(_shard(gen), SamplingSpec(n=n, max_new_tokens=tokens, seed=7))


def _rows(batch) -> list[tuple]:
    p, r = batch.prompt_offsets, batch.response_offsets
    return [(int(batch.prompt_index[i]), int(batch.sample_index[i]), batch.prompt_ids[p[i]:p[i + 1]].tolist(),
             batch.response_ids[r[i]:r[i + 1]].tolist(), batch.loss_mask[r[i]:r[i + 1]].tolist(),
             str(batch.finish_reason[i])) for i in range(len(batch))]


def test_continuous_gives_the_turn_synchronous_trajectories(gen):
    rep_t, turns = _run(gen, "turns", n=2)
    rep_c, cont = _run(gen, "continuous", n=2)
    assert _rows(cont) == _rows(turns)  # ids, masks, finish reasons: token for token
    np.testing.assert_allclose(cont.sampler_logprobs, turns.sampler_logprobs, atol=1e-4)
    np.testing.assert_allclose(cont.token_reward, turns.token_reward, atol=1e-6)
    assert rep_c.tokens == rep_t.tokens and rep_c.env["turns"] == rep_t.env["turns"] and rep_c.env["errors"] == 0
    assert 0 < rep_c.env["engine_seconds"] <= rep_c.env["wall_seconds"]
    assert 0 < rep_t.env["engine_seconds"] <= rep_t.env["wall_seconds"]


def test_a_slow_environment_keeps_the_engine_busier_under_continuous_batching(gen):
    """Steps sleep 0.3-0.9 s: turn-synchronous, the engine idles for the slowest environment of every
    turn; continuous, it decodes the trajectories whose environments have answered. (Wall times are
    printed, not compared: on a loaded 2-core machine a step's time varies 10x from run to run;
    ``ray-rlhf bench`` reports both, benchmarks/README.md.)"""
    slow = dict(name="ray_rlhf.bench.sleepy_env:SleepyLetters", kwargs={"turns": 3, "min_s": 0.3, "max_s": 0.9})
    got = {}
    for mode in ("turns", "continuous"):
        report, batch = _run(gen, mode, slow, n=2, tokens=4)
        e = report.env
        got[mode] = (e["engine_seconds"] / e["wall_seconds"], e["wall_seconds"])
        assert e["errors"] == 0 and e["trajectories"] == 8 and e["turns"] == 24
        assert e["seconds"] >= 0.9  # environment time: three turns of sleeps
    print("busy fraction, wall s:", got)
    assert got["continuous"][0] > got["turns"][0]


def test_continuous_with_environment_actors_gives_the_in_process_trajectories(gen):
    """``env.num_cpus=0.1`` (environments in two Ray actors, called through async proxies) under
    ``continuous``: the same rows as the in-process environments under ``turns``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _, turns = _run(gen, "turns", n=2)
        report, actors = _run(gen, "continuous", {"num_cpus": 0.1, "num_actors": 2}, n=2)
    finally:
        if gen._env_makers.pool is not None:  # its actors go before Ray does
            gen._env_makers.pool.shutdown()
            gen._env_makers.pool = None
        ray.shutdown()
    assert _rows(actors) == _rows(turns) and report.env["errors"] == 0
    np.testing.assert_allclose(actors.sampler_logprobs, turns.sampler_logprobs, atol=1e-4)
