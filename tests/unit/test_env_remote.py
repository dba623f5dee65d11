"""The environment host of ``env.num_cpus`` > 0 (:mod:`ray_rlhf.envs.remote`) as a plain class (no
Ray): the same answers as the environment itself; the pool's choice from the ``env`` spec. The
actors themselves: ``tests/integration/test_multiturn_generator.py``."""

from __future__ import annotations

import asyncio

import pytest

from ray_rlhf.envs.letters import LetterGame
from ray_rlhf.envs.remote import EnvHost, EnvHostPool, EnvMakers, RemoteEnv, env_pool_for
from ray_rlhf.errors import UserError


class BadShape:
    def reset(self, row):
        return None

    async def step(self, action):
        return ("only", "two")


def test_a_host_answers_as_the_environment_does():
    host = EnvHost("ray_rlhf.envs.letters:LetterGame", {"turns": 2, "seed": 3})
    game = LetterGame(turns=2, seed=3)
    row = {"answer": "1", "prompt_index": 5}

    async def play():
        first = await host.reset("a", row), await host.reset("b", {**row, "prompt_index": 6})
        return first, await host.step("a", "eeee"), await host.step("a", "aaa")

    (first_a, _), s1, s2 = asyncio.run(play())
    assert first_a == game.reset(row)
    assert s1 == game.step("eeee") and s2 == game.step("aaa") and s2.done
    assert asyncio.run(host.close(["a"])) == 1 and list(host.envs) == ["b"]


def test_a_wrong_step_shape_names_the_real_class():
    host = EnvHost(f"{__name__}:BadShape")

    async def play():
        await host.reset("k", {})
        return await host.step("k", "hi")

    with pytest.raises(UserError, match="BadShape.step returned a tuple of 2"):
        asyncio.run(play())


def test_the_pool_follows_the_env_spec():
    spec = {"name": "ray_rlhf.envs.letters:LetterGame", "kwargs": {"turns": 2}, "num_cpus": 0.5, "num_actors": 2}
    assert env_pool_for(None, {**spec, "num_cpus": None}) is None and env_pool_for(None, {**spec, "num_cpus": 0}) is None
    pool = env_pool_for(None, spec)
    assert isinstance(pool, EnvHostPool) and pool.num_actors == 2 and pool.started == 0  # hosts start on first use
    assert env_pool_for(pool, dict(spec)) is pool
    assert pool._proxy.__name__ == "LetterGame" and issubclass(pool._proxy, RemoteEnv)  # warnings name the class
    assert env_pool_for(pool, {**spec, "num_actors": 3}) is not pool


def test_without_env_num_cpus_environments_are_built_in_process():
    makers = EnvMakers()
    with makers.shard({"name": "ray_rlhf.envs.letters:LetterGame", "kwargs": {"turns": 5}, "num_cpus": 0}, LetterGame) as make:
        env = make()
    assert type(env) is LetterGame and env.turns == 5 and makers.pool is None


def test_env_actors_are_for_environments_not_agents():
    from ray_rlhf.config import RunConfig

    with pytest.raises(ValueError, match="env.num_cpus=1.0 runs environments"):
        RunConfig(env={"agent": "my_agents:rollout", "num_cpus": 1})
    assert RunConfig(env={"name": "ray_rlhf.envs.letters:LetterGame", "num_cpus": 0.1}).env.num_cpus == 0.1


def test_env_actors_count_in_the_local_cpu_check(monkeypatch):
    """``env.num_cpus`` x ``env.num_actors`` per generator is part of what a local Ray must hold."""
    from ray_rlhf.config import load_config
    from ray_rlhf.preflight import check_local_capacity

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = ["env.name=ray_rlhf.envs.letters:LetterGame", "ray.num_cpus=3", "generators.num=2", "generators.num_cpus=0.5"]
    check_local_capacity(load_config("tiny", [*base, "env.num_cpus=0.5"]))
    with pytest.raises(UserError, match=r"\+ env actors 2 x 2 x 0.5\) but this local Ray has 3"):
        check_local_capacity(load_config("tiny", [*base, "env.num_cpus=0.5", "env.num_actors=2"]))
