"""Fault injection (config ``faults.*``): the failures the tests and operators rehearse.

Each fault is injected the way it happens in production (``ray.kill`` of a live actor, an engine
that stops answering), so the system finds out through its ordinary paths: a failed call, a
missing answer. The faults live here only: with ``faults.*`` set, :class:`~ray_rlhf.run.actors.RunActors`
builds the generator pool as a :class:`FaultyPool` and the learner group as a
:class:`FaultyLearners`, which break things at the configured step around the real ``generate``
and ``step``; the pool, the learner group and the rollout code carry no fault arguments.

Which step a call belongs to is read from what the call already carries: a step's first
generation round samples with exactly :meth:`SamplingSpec.for_step` (dynamic sampling's later
rounds have seeds of their own, never a step's: :func:`ray_rlhf.run.sampling.round_seed`), and
the update of step ``s`` starts from learner version ``s - 1`` (one update per step, in
synchronous and asynchronous runs alike).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayActorError

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.generation.pool import GeneratorPool, PoolEvents
from ray_rlhf.learning.group import LearnerGroup
from ray_rlhf.learning.stats import LearnerStats
from ray_rlhf.records import PromptShard, SamplingSpec

log = logging.getLogger(__name__)


class FaultPlan:
    """When to break what, from ``faults.*``."""

    def __init__(self, cfg: RunConfig):
        self.faults = f = cfg.faults
        steps = {k.step for k in [*f.kill_generator, *f.hang_generator, *f.kill_reward]}
        self._rollout_steps = {SamplingSpec.for_step(cfg.rollout, cfg.seed, s): s for s in steps}
        """The first-round sampling of each step with a rollout fault -> that step."""
        self._learner_killed = False

    @property
    def breaks_actors(self) -> bool:
        """Whether a fault needs the pool or the learner group wrapped (``stop`` does not)."""
        f = self.faults
        return bool(f.kill_generator or f.hang_generator or f.kill_reward or f.kill_learner)

    def rollout_step(self, sampling: SamplingSpec) -> int | None:
        """The step whose first generation round samples with ``sampling``, if that step has a
        rollout fault; None otherwise (other steps, and the later rounds of dynamic sampling)."""
        return self._rollout_steps.get(sampling)

    def generators_to_kill(self, step: int) -> list[int]:
        """Pool positions to kill as this step's shards are dispatched."""
        return [k.index for k in self.faults.kill_generator if k.step == step]

    def generators_to_hang(self, step: int) -> list[int]:
        """Pool positions that stop answering just before this step's shards are dispatched."""
        return [k.index for k in self.faults.hang_generator if k.step == step]

    def kills_reward(self, step: int) -> bool:
        """``faults.kill_reward``: the reward actor dies before this step's scoring."""
        return any(k.step == step for k in self.faults.kill_reward)

    @property
    def learner_kill_pending(self) -> bool:
        return bool(self.faults.kill_learner) and not self._learner_killed

    def kills_learner(self, step: int) -> bool:
        """``faults.kill_learner``: learner rank 0 dies in the update of its first event's step (the
        first time only: the recovered run replays this step)."""
        if self.learner_kill_pending and self.faults.kill_learner[0].step == step:
            self._learner_killed = True
            return True
        return False

    def stop_after(self, step: int, last_step: int) -> bool:
        """``faults.stop``: exit as if preempted after the checkpoint of its earliest step."""
        stops = [k.step for k in self.faults.stop]
        if stops and min(stops) == step and step < last_step:
            log.warning("fault injection: stopping after step %d (re-run the same command to resume)", step)
            return True
        return False


class FaultyPool(GeneratorPool):
    """The generator pool with the rollout faults of ``faults.*`` around each step's first round.

    Before the real :meth:`GeneratorPool.generate`: ``hang_generator`` members stop answering
    (their shard then runs past its deadline) and ``kill_generator`` members are killed (the shard
    they are handed fails and is re-queued). After it: with ``kill_reward`` the reward
    actor is killed, as the step's batches go to it for scoring (Ray restarts it and retries the
    call). Killed and hung members stay in the pool, which finds out as it would in production.
    """

    def __init__(self, *args: Any, plan: FaultPlan, reward: Any, **kwargs: Any):
        self.plan, self.reward = plan, reward
        super().__init__(*args, **kwargs)

    def generate(self, shards: list[PromptShard], sampling: SamplingSpec) -> tuple[list[Any], PoolEvents]:
        step = self.plan.rollout_step(sampling)
        if step is None:
            return super().generate(shards, sampling)
        for index in self.plan.generators_to_hang(step):
            log.warning("fault injection: generator %s stops answering", self.hang(index))
        for index in self.plan.generators_to_kill(step):
            log.warning("fault injection: killing generator %s", self.kill(index))
        out = super().generate(shards, sampling)
        if self.plan.kills_reward(step):
            log.warning("fault injection: killing the reward actor (Ray restarts it)")
            ray.kill(self.reward, no_restart=False)
        return out

    def hang(self, index: int) -> str:
        """The member at ``index`` stops answering but stays alive (its next call waits behind a
        long sleep), as a wedged engine would."""
        gid = list(self.members)[index % len(self.members)]
        self.members[gid].handle.__ray_call__.remote(_sleep_forever)
        return gid


def _sleep_forever(_generator) -> None:
    time.sleep(24 * 3600)


class FaultyLearners(LearnerGroup):
    """The learner group with ``faults.kill_learner``: rank 0 is killed as the update of
    that step is handed to the ranks, so :meth:`LearnerGroup.step` fails with the
    :class:`~ray_rlhf.learning.group.LearnerError` naming it (the driver then recovers)."""

    def __init__(self, *args: Any, plan: FaultPlan, **kwargs: Any):
        self.plan = plan
        super().__init__(*args, **kwargs)

    def step(self, batch: Any) -> LearnerStats:
        if self.plan.learner_kill_pending:
            try:
                step = ray.get(self.source.ping.remote()) + 1  # the learner's version is the last step's
            except RayActorError:  # already dead: the real step names it
                step = None
            if step is not None and self.plan.kills_learner(step):
                log.warning("fault injection: killing learner rank 0 during the update of step %d", step)
                ray.kill(self.source, no_restart=True)
        return super().step(batch)
