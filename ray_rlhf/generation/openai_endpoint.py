"""Agents written against the OpenAI client: a chat-completions endpoint in the generator.

With ``env.agent=module:function`` set, a shard's rollouts are ``await rollout(client, row,
**env.kwargs)`` calls -- ``async def rollout(client, row) -> reward`` -- each given its own
``openai.AsyncOpenAI`` client whose ``base_url`` names a session of an HTTP endpoint this generator
serves on 127.0.0.1 for the shard (``http://127.0.0.1:PORT/s/<session>/v1``):

* ``POST /s/<session>/v1/chat/completions``: ``messages``, ``max_tokens`` / ``max_completion_tokens``
  (capped by ``rollout.max_new_tokens`` and the room under ``rollout.max_total_tokens``), ``stop``,
  ``tools`` (passed to the chat template; Hermes / Qwen ``<tool_call>`` blocks in a completion come
  back as OpenAI ``tool_calls``, finish reason ``tool_calls``); ``n`` must be 1, ``stream`` false.
  The run's sampling (``rollout.temperature``, ``top_p``, the per-turn seed) always applies: a
  request's ``temperature`` / ``top_p`` / ``seed`` are ignored, because the learner's importance
  ratios assume the distribution the run samples from. The answer is OpenAI's ``chat.completion``
  object with ``usage``.
* ``GET /s/<session>/v1/models`` (and ``/v1/models``): one model, ``policy``.

Each session is one trajectory, token in and token out (:class:`~ray_rlhf.generation.agent_session.Session`):
a request must extend the conversation so far, or it is refused with a 400 naming the message
that differs. When ``rollout`` returns its reward, the session becomes one row of the multi-turn
record. A rollout that raises, returns no number, or spends more than ``env.step_timeout_s`` of its
own time (before its first request, between a completion and its next request, after its last)
ends with finish reason ``env_error``; the shard goes on.

Batching: requests from concurrent rollouts are collected for ``window_s`` (5 ms) and sampled in one
engine call (:class:`BatchingSampler`) in a worker thread, so the event loop keeps serving the
agents meanwhile; requests arriving while the engine runs go together in the next call. (Not
continuous batching: a request waits for the engine call in progress to end.)
"""

from __future__ import annotations

import asyncio
import logging
import numbers
import time
import uuid
from collections.abc import Callable, Sequence

from ray_rlhf.generation.agent_session import Session, SessionError, sessions_to_batch
from ray_rlhf.generation.trajectory import EnvStats, Sampled, Sampler, TemplateDelta, TrajectoryLimits, TurnRequest
from ray_rlhf.records import PromptItem, RolloutBatch

__all__ = ["BatchingSampler", "ChatEndpoint", "MODEL_NAME", "run_agent_rollouts"]

log = logging.getLogger(__name__)

MODEL_NAME = "policy"
"""The one model ``/v1/models`` lists (any ``model`` name in a request is accepted)."""


class BatchingSampler:
    """Collects the turns requested by concurrent sessions for ``window_s`` and samples them in one
    call of ``sampler`` (in a worker thread); one engine call at a time. Records each call's size in
    :attr:`batch_sizes` and the engine's busy time in :attr:`busy_seconds`."""

    def __init__(self, sampler: Sampler, window_s: float = 0.005):
        self.sampler, self.window_s = sampler, float(window_s)
        self.pending: list[tuple[TurnRequest, asyncio.Future]] = []
        self.batch_sizes: list[int] = []
        self.busy_seconds = 0.0
        self.error: BaseException | None = None
        """The first exception the engine raised (the shard fails with it: not the agents' fault)."""
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def sample(self, request: TurnRequest) -> Sampled:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((request, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.window_s)
            batch, self.pending = self.pending, []
            batch = [(r, f) for r, f in batch if not f.done()]  # cancelled meanwhile
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                outs = await loop.run_in_executor(None, self.sampler, [r for r, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to every waiting request, raised after the shard
                outs = [e] * len(batch)
                self.error = self.error or e
            self.busy_seconds += time.perf_counter() - t0
            self.batch_sizes.append(len(batch))
            for (_, fut), out in zip(batch, outs):
                if not fut.done():
                    fut.set_exception(out) if isinstance(out, Exception) else fut.set_result(out)
            if self.pending:
                self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _error(status: int, message: str, code: str = "invalid_request"):
    from aiohttp import web

    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": code}}, status=status)


class ChatEndpoint:
    """The HTTP side: ``sessions`` (id -> :class:`Session`) served on 127.0.0.1 at an ephemeral port
    (:meth:`start`), every completion sampled through ``batcher``."""

    def __init__(self, batcher: BatchingSampler):
        self.batcher = batcher
        self.sessions: dict[str, Session] = {}
        self.port: int | None = None
        self._runner = None

    def base_url(self, session_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/s/{session_id}/v1"

    async def start(self) -> int:
        from aiohttp import web

        app = web.Application(client_max_size=256 * 2**20)  # whole conversations in every request
        app.router.add_post("/s/{sid}/v1/chat/completions", self._completions)
        app.router.add_get("/s/{sid}/v1/models", self._models)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request):
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                                              "owned_by": "ray-rlhf"}]})

    async def _completions(self, request):
        from aiohttp import web

        sid = request.match_info["sid"]
        session = self.sessions.get(sid)
        if session is None:
            return _error(404, f"no live rollout session {sid!r} (it ended, or the base_url is not the one the "
                               "rollout was given)", "session_not_found")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if body.get("stream"):
            return _error(400, "stream=true is not supported; request whole completions")
        if int(body.get("n") or 1) != 1:
            return _error(400, "n must be 1: each rollout samples one completion per request")
        stop = body.get("stop")
        stop = (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop or ())
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        try:
            turn = session.prepare(body.get("messages"), None if max_tokens is None else int(max_tokens),
                                   body.get("tools"))
        except SessionError as e:
            return _error(e.status, str(e), e.code)
        except (TypeError, ValueError) as e:
            return _error(400, f"bad request: {e}")
        try:
            out = await self.batcher.sample(turn._replace(stop=stop))
        except Exception:
            session.release()
            raise
        if self.sessions.get(sid) is not session:  # the rollout ended (timed out) meanwhile
            return _error(409, "the rollout ended while this completion was generated", "session_closed")
        message, finish = session.record(turn, out)
        usage = {"prompt_tokens": len(turn.prompt_ids), "completion_tokens": len(out.token_ids),
                 "total_tokens": len(turn.prompt_ids) + len(out.token_ids)}
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": str(body.get("model") or MODEL_NAME),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage,
        })


async def _watch(task: asyncio.Task, session: Session, timeout_s: float) -> None:
    """Wait for ``task`` (the rollout); cancel it when the agent holds the turn -- no request of its
    session is with the engine -- for more than ``timeout_s`` at a stretch (then ``TimeoutError``)."""
    session.idle_since = time.monotonic()
    while not task.done():
        wait = min(timeout_s, 0.25) if session.busy else session.idle_since + timeout_s - time.monotonic()
        if wait <= 0:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise TimeoutError(f"no request or return within env.step_timeout_s={timeout_s:g}")
        await asyncio.wait({task}, timeout=wait)


async def run_agent_rollouts(items: Sequence[PromptItem], n: int, sampler: Sampler, rollout: Callable,
                             delta: TemplateDelta, limits: TrajectoryLimits, kwargs: dict | None = None,
                             seed: int | None = None, policy_version: int = 0, generator_id: str = "",
                             window_s: float = 0.005) -> tuple[RolloutBatch, EnvStats, BatchingSampler]:
    """``n`` rollouts of every prompt of ``items`` through the endpoint, ordered by (prompt, sample):
    the batch, the shard's counts and the batcher (its ``batch_sizes``). ``rollout``:
    ``async def rollout(client, row, **kwargs) -> reward``; ``row``: the prompt's columns, its
    ``prompt`` (the text as the dataset gave it, chat template applied for message prompts) and
    ``prompt_index``."""
    import httpx
    from openai import AsyncOpenAI

    t0 = time.perf_counter()
    # One connection pool for every rollout's client (a client of its own costs ~40 ms, its SSL set-up),
    # never through a proxy (127.0.0.1).
    http = httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
    batcher = BatchingSampler(sampler, window_s)
    endpoint = ChatEndpoint(batcher)
    await endpoint.start()
    name = f"{getattr(rollout, '__module__', '?')}:{getattr(rollout, '__qualname__', rollout)}"
    sessions = [Session(item, j, delta, limits, seed) for item in items for j in range(n)]

    async def one(session: Session) -> None:
        sid = uuid.uuid4().hex
        endpoint.sessions[sid] = session
        client = AsyncOpenAI(base_url=endpoint.base_url(sid), api_key="ray-rlhf", max_retries=0, http_client=http)
        row = {**session.item.columns, "prompt": session.item.text, "prompt_index": session.item.index}

        async def call():  # a call that fails at once (e.g. its arguments) fails inside the task
            return await rollout(client, row, **(kwargs or {}))

        task = asyncio.ensure_future(call())
        try:
            await _watch(task, session, limits.step_timeout_s)
            reward, error = task.result(), None
        except BaseException as e:  # noqa: BLE001 - the agent's failure ends only its trajectory
            if isinstance(e, asyncio.CancelledError) and not task.cancelled():
                raise
            reward, error = None, f"{type(e).__name__}: {e}"
        finally:
            endpoint.sessions.pop(sid, None)
        if error is None and not isinstance(reward, numbers.Real):
            error = f"returned {type(reward).__name__} {reward!r:.60}; return the reward as a number"
        session.close(reward, error)
        if error is not None:
            log.warning("agent %s failed for prompt %d sample %d after %d completions: %s; ending the trajectory "
                        "(%s)", name, session.item.index, session.sample, session.turns, error, session.finish)

    try:
        await asyncio.gather(*(one(s) for s in sessions))
    finally:
        await http.aclose()
        await endpoint.stop()
        await batcher.aclose()
    if batcher.error is not None:
        raise batcher.error
    columns = list(items[0].columns) if items else []
    batch, stats = sessions_to_batch(sessions, columns, policy_version, generator_id)
    stats.seconds = max(0.0, time.perf_counter() - t0 - batcher.busy_seconds)
    return batch, stats, batcher
