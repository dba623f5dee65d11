"""Environments in Ray actors of their own (``env.num_cpus`` > 0), for heavy or sandboxed ones.

Each generator keeps a small pool of ``env.num_actors`` *env-host* actors (:class:`EnvHost`, each
reserving ``env.num_cpus`` CPUs). A host holds many environment instances, one per trajectory,
keyed by a trajectory id; trajectories are spread over the hosts round robin. The trajectory code
sees :class:`RemoteEnv` objects with the same ``reset(row)`` / ``step(action)`` interface (both
``async def``), so ``env.step_timeout_s`` and the ``env_error`` handling apply unchanged:

* the environment's own code runs in the host (a synchronous method in a daemon thread, so a hung
  ``step`` blocks neither the host nor other trajectories); its exceptions come back to the caller;
* a host that dies (a crash, an OOM kill) fails the calls of *its* trajectories (``env_error``); the
  run goes on, and the pool starts a new host in its place for the next shard.

Instances are dropped from their host when the shard ends (:meth:`EnvHostPool.release`). The hosts
are the generator's children: they end with it. The generator gets each shard's ``make_env`` from
:meth:`EnvMakers.shard` (in-process instances when ``env.num_cpus`` is empty or 0).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ray_rlhf.envs.base import StepResult, check_step, load_env_class

__all__ = ["EnvHost", "EnvHostPool", "EnvMakers", "RemoteEnv", "env_pool_for"]

log = logging.getLogger(__name__)


def _in_daemon_thread(fn: Callable, arg: Any) -> concurrent.futures.Future:
    """``fn(arg)`` in a daemon thread (a hung environment never blocks the host's exit)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn(arg))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name="env-host-call").start()
    return fut


async def _call(fn: Callable, arg: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(arg)
    result = await asyncio.wrap_future(_in_daemon_thread(fn, arg))
    return await result if inspect.isawaitable(result) else result


class EnvHost:
    """Environment instances of one class, keyed by trajectory id (a Ray actor at launch: async
    methods, so the calls of many trajectories run concurrently).

    Args:
        name: ``env.name`` (``module:Class``).
        kwargs: ``env.kwargs``, the constructor's keyword arguments.
    """

    def __init__(self, name: str, kwargs: dict | None = None):
        self.cls = load_env_class(name)
        self.kwargs = dict(kwargs or {})
        self.envs: dict[str, Any] = {}

    async def reset(self, key: str, row: dict) -> Any:
        """Build trajectory ``key``'s environment and return its first observation."""
        env = self.cls(**self.kwargs)
        self.envs[key] = env
        return await _call(env.reset, row)

    async def step(self, key: str, action: str) -> StepResult:
        """Trajectory ``key``'s step, checked (:func:`~ray_rlhf.envs.base.check_step`: a wrong shape
        is a ``UserError`` naming the real class)."""
        env = self.envs[key]
        return check_step(env, await _call(env.step, action))

    async def close(self, keys: list[str]) -> int:
        """Drop these trajectories' environments; the number still held."""
        for k in keys:
            self.envs.pop(k, None)
        return len(self.envs)


class RemoteEnv:
    """One trajectory's environment in an :class:`EnvHost`: ``reset`` / ``step`` as the environment's,
    awaited over Ray. A dead host raises ``ray.exceptions.RayActorError`` (the trajectory's
    ``env_error``) and is replaced in the pool for later shards."""

    def __init__(self, pool: EnvHostPool, slot: int, host: Any, key: str):
        self.pool, self.slot, self.host, self.key = pool, slot, host, key

    async def _await(self, ref) -> Any:
        import ray

        try:
            return await asyncio.wrap_future(ref.future())
        except ray.exceptions.RayActorError:
            self.pool.lost(self.slot, self.host)
            raise

    async def reset(self, row: dict) -> Any:
        return await self._await(self.host.reset.remote(self.key, row))

    async def step(self, action: str) -> StepResult:
        return await self._await(self.host.step.remote(self.key, action))


class EnvHostPool:
    """``num_actors`` :class:`EnvHost` actors of ``num_cpus`` CPUs each, started on first use.

    :meth:`make` is the trajectory code's ``make_env``: a :class:`RemoteEnv` on the next host round
    robin. :meth:`release` drops the instances made since the last release (call it when a shard ends).
    """

    def __init__(self, name: str, kwargs: dict, num_cpus: float, num_actors: int = 1):
        self.spec = (name, repr(sorted(dict(kwargs).items())), float(num_cpus), int(num_actors))
        self.name, self.kwargs = name, dict(kwargs)
        self.num_cpus, self.num_actors = float(num_cpus), max(1, int(num_actors))
        self.hosts: list[Any] = [None] * self.num_actors
        self.keys: list[list[str]] = [[] for _ in range(self.num_actors)]
        self.started = 0
        """Hosts started so far (replacements of dead ones included)."""
        self._next = 0
        # The proxies' class is named after the environment's, so that the trajectory code's warnings
        # ("environment LetterGame failed at turn 2 ...") name the user's class, not this wrapper.
        self._proxy = type(name.rpartition(":")[2] or "RemoteEnv", (RemoteEnv,), {"__module__": name.partition(":")[0]})

    def _host(self, slot: int) -> Any:
        if self.hosts[slot] is None:
            import ray

            self.hosts[slot] = ray.remote(num_cpus=self.num_cpus, max_restarts=0)(EnvHost).remote(self.name, self.kwargs)
            self.started += 1
        return self.hosts[slot]

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the missing hosts and wait until they answer (at most ``timeout_s``), so that an
        actor's start-up does not count against ``env.step_timeout_s``. Hosts not up by then (no room
        in the cluster) are left starting: their trajectories' calls time out (``env_error``)."""
        import ray

        new = [self._host(slot) for slot in range(self.num_actors) if self.hosts[slot] is None]
        if new:
            _, pending = ray.wait([h.close.remote([]) for h in new], num_returns=len(new), timeout=timeout_s)
            if pending:
                log.warning("%d of %d environment actors (env.num_cpus=%g) not up after %.0f s; is there room "
                            "in the cluster?", len(pending), len(new), self.num_cpus, timeout_s)

    def make(self) -> RemoteEnv:
        slot = self._next % self.num_actors
        self._next += 1
        key = uuid.uuid4().hex
        self.keys[slot].append(key)
        return self._proxy(self, slot, self._host(slot), key)

    def lost(self, slot: int, host: Any) -> None:
        """``host`` died: forget it (a new one is started when ``slot`` is next used)."""
        if self.hosts[slot] is host:
            self.hosts[slot] = None
            self.keys[slot] = []

    def release(self) -> None:
        """Drop the instances made since the last call from their (live) hosts; does not wait."""
        for slot, host in enumerate(self.hosts):
            if host is not None and self.keys[slot]:
                host.close.remote(self.keys[slot])
            self.keys[slot] = []

    def shutdown(self) -> None:
        import ray

        for host in self.hosts:
            if host is not None:
                ray.kill(host)
        self.hosts = [None] * self.num_actors


class EnvMakers:
    """A generator's ``make_env`` per shard: new instances in its own process, or (``env.num_cpus``
    > 0) :class:`RemoteEnv` objects on its :class:`EnvHostPool`, kept from shard to shard."""

    def __init__(self):
        self.pool: EnvHostPool | None = None

    @contextlib.contextmanager
    def shard(self, env: dict, cls: type) -> Iterator[Callable[[], Any]]:
        """``make_env`` for one shard of the ``env`` spec (``cls``: the loaded ``env.name``); the
        pool's hosts are up before it is handed out, and the shard's instances dropped after."""
        self.pool = env_pool_for(self.pool, env)
        if self.pool is None:
            kwargs = dict(env.get("kwargs") or {})
            yield lambda: cls(**kwargs)
            return
        self.pool.start()
        try:
            yield self.pool.make
        finally:
            self.pool.release()


def env_pool_for(pool: EnvHostPool | None, env: dict | None) -> EnvHostPool | None:
    """The pool for the generator's ``env`` spec (``num_cpus``, ``num_actors``): ``pool`` when it
    matches, else a new one (the old one shut down); None when environments run in-process
    (``num_cpus`` empty or 0, or an ``env.agent`` run)."""
    if not env or not env.get("name") or not env.get("num_cpus"):
        if pool is not None:
            pool.shutdown()
        return None
    new = EnvHostPool(env["name"], env.get("kwargs") or {}, env["num_cpus"], env.get("num_actors") or 1)
    if pool is not None and pool.spec == new.spec:
        return pool
    if pool is not None:
        pool.shutdown()
    return new
