"""Drive an in-process vLLM engine step by step from an asyncio loop (continuous batching).

``vllm.LLM.generate`` adds a batch of requests and steps the engine until all of them finish. For
multi-turn rollouts that makes every turn wait for the slowest trajectory and leaves the engine idle
while environments step. :class:`EngineStepper` instead adds each request on its own
(``llm.llm_engine.add_request``, as ``LLM.generate`` does internally, with ``FINAL_ONLY`` outputs)
and calls ``llm.llm_engine.step()`` -- one scheduler iteration: prefill or one decode token of every
running request -- for as long as any request is unfinished, returning to the event loop between
steps so that finished turns' environments run and new turns are added while the others decode.

Busy time: the wall time inside ``step()`` (:attr:`EngineStepper.busy_seconds`); the engine is idle
when no request is unfinished (every live trajectory waits on its environment).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray_rlhf.generation.trajectory import Sampled, TurnRequest

__all__ = ["EngineStepper", "run_continuous", "turn_params", "turns_sampler"]

T = TypeVar("T")


class EngineStepper:
    """Continuous batching over one ``vllm.LLM``'s engine.

    Args:
        llm: the in-process ``vllm.LLM``.
        params_for: the ``SamplingParams`` of one :class:`TurnRequest` (``n=1``, its seed, max tokens,
            ``logprobs=0``, ``flat_logprobs=True``).
        lora_request: served adapter for every request (``lora.sync=adapter``), or None.
        name: for error messages.
    """

    _ids = itertools.count()

    def __init__(self, llm: Any, params_for: Callable[[TurnRequest], Any], lora_request: Any = None,
                 name: str = "engine"):
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._engine, self._params_for, self._lora, self.name = llm.llm_engine, params_for, lora_request, name
        self._prompt, self._final = TokensPrompt, RequestOutputKind.FINAL_ONLY
        self._waiting: dict[str, asyncio.Future] = {}
        self._wake: asyncio.Event | None = None
        self.busy_seconds = 0.0
        """Wall time inside ``engine.step()``."""
        self.steps = 0
        self.requests = 0

    async def sample(self, req: TurnRequest) -> Sampled:
        """Add ``req`` to the running engine; return when its turn is sampled."""
        params = self._params_for(req)
        params.output_kind = self._final
        rid = f"turn-{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._engine.add_request(rid, self._prompt(prompt_token_ids=list(req.prompt_ids)), params,
                                 lora_request=self._lora)
        self.requests += 1
        if self._wake is not None:
            self._wake.set()
        return await fut

    def _finish(self, out: Any) -> None:
        fut = self._waiting.pop(out.request_id, None)
        if fut is None or fut.done():
            return
        c = out.outputs[0]
        if c.finish_reason not in ("stop", "length"):
            fut.set_exception(RuntimeError(f"{self.name}: a turn finished with {c.finish_reason!r}"))
            return
        fut.set_result(Sampled(list(c.token_ids), list(c.logprobs.logprobs), c.finish_reason, c.text))

    async def run(self, main: Awaitable[T]) -> T:
        """Run ``main`` (coroutines that call :meth:`sample`) while stepping the engine; its result."""
        self._wake = asyncio.Event()
        task = asyncio.ensure_future(main)
        try:
            while not task.done():
                if self._engine.has_unfinished_requests():
                    t0 = time.perf_counter()
                    outs = self._engine.step()
                    self.busy_seconds += time.perf_counter() - t0
                    self.steps += 1
                    for out in outs:
                        if out.finished:
                            self._finish(out)
                    await asyncio.sleep(0)  # let finished turns' trajectories go on
                else:  # every live trajectory waits on its environment
                    self._wake.clear()
                    waker = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({task, waker}, return_when=asyncio.FIRST_COMPLETED)
                    waker.cancel()
        finally:
            if not task.done():
                task.cancel()
            if self._waiting:  # main failed with turns in flight: drop them from the engine
                self._engine.abort_request(list(self._waiting))
                self._waiting.clear()
            self._wake = None
        return task.result()


def turn_params(sampling: Any) -> Callable[[TurnRequest], Any]:
    """The vLLM ``SamplingParams`` of one turn with the run's sampling settings (a
    :class:`~ray_rlhf.records.SamplingSpec`): one sample, the turn's seed and room, the sampled ids'
    log-probs (``logprobs=0``, flat)."""
    from vllm import SamplingParams

    def params(r: TurnRequest) -> Any:
        return SamplingParams(n=1, max_tokens=r.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              seed=r.seed, logprobs=0, flat_logprobs=True, ignore_eos=sampling.ignore_eos,
                              stop=list(r.stop) or None)

    return params


def run_continuous(llm: Any, sampling: Any, lora_request: Any, name: str, items, n: int, make_env, delta, limits,
                   policy_version: int) -> tuple[Any, Any]:
    """:func:`~ray_rlhf.generation.continuous.run_trajectories_continuous` on ``llm``'s engine, stepped
    by an :class:`EngineStepper`; the stats' ``engine_seconds`` is the stepper's busy time."""
    from ray_rlhf.generation.continuous import run_trajectories_continuous

    stepper = EngineStepper(llm, turn_params(sampling), lora_request, name)
    batch, stats = asyncio.run(stepper.run(run_trajectories_continuous(
        items, n, stepper.sample, make_env, delta, limits, seed=sampling.seed, policy_version=policy_version,
        generator_id=name)))
    stats.engine_seconds = stepper.busy_seconds
    return batch, stats


def turns_sampler(llm: Any, sampling: Any, lora_request: Any, name: str) -> Callable[[list[TurnRequest]], list[Sampled]]:
    """Turn-synchronous sampling (``env.scheduling=turns``): one turn of every request in one
    ``llm.generate`` call."""
    from vllm.inputs import TokensPrompt

    params_for = turn_params(sampling)

    def sample(requests: list[TurnRequest]) -> list[Sampled]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests],
                            [params_for(r) for r in requests], use_tqdm=False, lora_request=lora_request)
        done = []
        for out in outs:
            c = out.outputs[0]
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"{name}: a turn finished with {c.finish_reason!r}")
            done.append(Sampled(list(c.token_ids), list(c.logprobs.logprobs), c.finish_reason, c.text))
        return done

    return sample

