"""DAPO's dynamic sampling (ray_rlhf/run/sampling.py; the rounds in run/rollouts.py), on hand-made
scored batches: which groups are kept, in what order, the counts, the seeds of the rounds, and the
rounds loop with a fake pool and reward (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ray_rlhf.config import load_config
from ray_rlhf.data.prompts import PromptStream
from ray_rlhf.generation.pool import PoolEvents
from ray_rlhf.records import PromptItem, RolloutBatch, SamplingSpec
from ray_rlhf.run import rollouts, sampling
from ray_rlhf.run.sampling import ROUND_STRIDE, keep_informative, round_sampling, round_seed, select_informative
from tests.batches import make_batch


def groups(*spec: tuple[int, list[float]]) -> RolloutBatch:
    """A scored batch: one group per ``(prompt_index, rewards)``, its samples 0..n-1, in the given order."""
    return make_batch([{"prompt_index": p, "sample_index": j, "reward": r, "response": f"p{p}s{j}"}
                       for p, rewards in spec for j, r in enumerate(rewards)])


# ------------------------------------------------------------------------------ group selection


def test_keeps_the_first_informative_groups_in_batch_order():
    # Drawn in the order 7, 3, 9, 1, 5 (not sorted: the stream's shuffle). Zero spread: 7 (1 = 1) and
    # 9 (0.5 = 0.5 = 0.5); informative: 3, 1, 5. With limit 2 the first two of those, 3 then 1.
    batch = groups((7, [1.0, 1.0]), (3, [0.0, 1.0]), (9, [0.5, 0.5, 0.5]), (1, [0.2, 0.3]), (5, [1.0, 0.0]))
    sel = select_informative(batch, limit=2)
    assert sel.rows.tolist() == [2, 3, 7, 8]  # rows 0-1 are group 7, 2-3 group 3, 4-6 group 9, 7-8 group 1
    assert (sel.kept, sel.informative, sel.discarded) == (2, 3, 2)
    assert sel.group_rows.tolist() == [2, 2]
    kept = batch.select(sel.rows)
    assert kept.keys() == [(3, 0), (3, 1), (1, 0), (1, 1)]
    assert kept.reward.tolist() == [0.0, 1.0, 0.2, 0.3]


def test_limit_above_the_informative_count_keeps_all_of_them_and_zero_keeps_none():
    batch = groups((4, [0.0, 0.0]), (2, [0.0, 2.0, 0.0]), (8, [3.0, 3.0]), (6, [1.0, 0.5]))
    sel = select_informative(batch, limit=16)
    assert batch.select(sel.rows).keys() == [(2, 0), (2, 1), (2, 2), (6, 0), (6, 1)]
    assert (sel.kept, sel.informative, sel.discarded) == (2, 2, 2)
    assert sel.group_rows.tolist() == [3, 2]  # groups may differ in size
    none = select_informative(batch, limit=0)
    assert none.rows.tolist() == [] and (none.kept, none.informative, none.discarded) == (0, 2, 2)


def test_all_equal_and_all_informative():
    flat = groups((0, [0.0, 0.0]), (1, [1.0, 1.0]))
    sel = select_informative(flat, limit=2)
    assert (sel.kept, sel.informative, sel.discarded, len(sel.rows)) == (0, 0, 2, 0)
    rich = groups((0, [0.0, 1.0]), (1, [1.0, 0.0]))
    sel = select_informative(rich, limit=2)
    assert sel.rows.tolist() == [0, 1, 2, 3] and (sel.kept, sel.discarded) == (2, 0)


def test_rewards_are_compared_as_the_learner_reads_them():
    # 1.0 and 1.0 + 1e-12 differ in float64 but are the same float32 (spacing at 1.0 is 1.2e-7):
    # the learner's zero_std_groups would see no spread, so the group is discarded. 1.0 vs 1.0 + 1e-6
    # (8 float32 ulps apart) is kept.
    batch = groups((0, [1.0, 1.0 + 1e-12]), (1, [1.0, 1.0 + 1e-6]))
    sel = select_informative(batch, limit=2)
    assert batch.select(sel.rows).keys() == [(1, 0), (1, 1)] and sel.discarded == 1


def test_multi_turn_rows_are_scored_by_final_plus_turn_rewards():
    """As the group estimators score them: group 0's final rewards are equal but row 1 earned a turn
    reward of 0.5 (informative: 1.0 vs 1.5); group 1's differ but row 0's turn reward of 1.0 evens
    them (2.0 vs 2.0: discarded); group 2's only turn reward sits on an observation token (loss mask
    0), which carries none (0 vs 0: discarded)."""
    import dataclasses

    batch = groups((0, [1.0, 1.0]), (1, [1.0, 2.0]), (2, [0.0, 0.0]))  # 6 rows of 4 response tokens
    turns = np.zeros((6, 4), np.float32)
    loss = np.ones((6, 4), np.int8)
    turns[1, 1], turns[2, 3], turns[4, 2] = 0.5, 1.0, 0.5
    loss[:, 2] = 0  # every row: model, model, observation, model
    multi = dataclasses.replace(batch, token_reward=turns.ravel(), loss_mask=loss.ravel())
    assert sampling.row_scores(multi).tolist() == [1.0, 1.5, 2.0, 2.0, 0.0, 0.0]
    assert sampling.row_scores(multi).dtype == np.float32
    sel = select_informative(multi, limit=3)
    assert multi.select(sel.rows).keys() == [(0, 0), (0, 1)] and (sel.kept, sel.discarded) == (1, 2)
    # single-turn rows (no token rewards): the final reward alone, as before
    assert select_informative(batch, limit=3).rows.tolist() == [2, 3]


def test_refuses_a_batch_that_starts_inside_a_group_or_is_unscored():
    with pytest.raises(ValueError, match="start with sample 0"):
        select_informative(make_batch([{"sample_index": 1, "reward": 0.0}, {"sample_index": 0, "reward": 1.0}]), 1)
    with pytest.raises(ValueError, match="scored"):
        select_informative(make_batch([{"sample_index": 0}, {"sample_index": 1}]), 1)


def test_keep_informative_over_rounds_and_its_counts():
    round1 = groups((5, [1.0, 1.0]), (2, [0.0, 1.0]), (7, [0.0, 0.0]))
    round2 = groups((0, [0.5, 0.5]), (3, [0.1, 0.9]), (1, [0.4, 0.6]))
    out, res = keep_informative(2, round1, round2)  # want 2 groups: 2 (round 1), then 3 (round 2)
    assert out.keys() == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert (res.kept, res.informative, res.discarded) == (2, 3, 3)  # 5, 7, 0 discarded; 1 beyond the limit
    assert res.summary.count == 4 and res.summary.reward_mean == pytest.approx((0 + 1 + 0.1 + 0.9) / 4)
    # Fewer than wanted: all of them.
    out, res = keep_informative(4, round1, round2)
    assert [k[0] for k in out.keys()] == [2, 2, 3, 3, 1, 1] and res.kept == 3


def test_keep_informative_without_a_usable_group_returns_the_first_round_as_it_is():
    round1 = groups((5, [1.0, 1.0]), (7, [0.0, 0.0]))
    round2 = groups((0, [0.5, 0.5]), (3, [0.3, 0.3]))
    out, res = keep_informative(2, round1, round2)
    assert out is round1 and (res.kept, res.informative, res.discarded) == (0, 0, 4)
    assert res.summary.count == 4


# ------------------------------------------------------------------------------ seeds


def test_round_seeds_never_repeat_a_step_seed_or_each_other():
    step_seeds = {SamplingSpec.for_step(SimpleNamespace(samples_per_prompt=2, max_new_tokens=8, temperature=1.0,
                                                        top_p=1.0, ignore_eos=False), seed, step).seed
                  for seed in range(3) for step in range(1, 60)}
    rounds = [round_seed(s, r) for s in step_seeds for r in range(1, 6)]
    assert len(set(rounds)) == len(rounds)
    assert not set(rounds) & step_seeds
    assert all(round_seed(s, 0) == s for s in step_seeds)
    # By hand: run seed 0, step 1 -> step seed 1; round 2 -> -(1 * 1_000_003 + 2).
    assert round_seed(1, 2) == -(ROUND_STRIDE + 2) == -1_000_005
    with pytest.raises(ValueError):
        round_seed(1, ROUND_STRIDE)


def test_round_sampling_changes_only_the_seed():
    spec = SamplingSpec(n=4, max_new_tokens=16, temperature=0.7, top_p=1.0, seed=12)
    assert round_sampling(spec, 0) is spec
    r1 = round_sampling(spec, 1)
    assert (r1.n, r1.max_new_tokens, r1.temperature, r1.top_p) == (4, 16, 0.7, 1.0) and r1.seed == round_seed(12, 1)


# ------------------------------------------------------------------------------ the rounds loop


class FakePool:
    """Generates ``n`` samples per prompt whose rewards come from ``rewards[prompt_index]``."""

    def __init__(self, n: int):
        self.n, self.calls = n, []

    def generate(self, shards, sampling):
        self.calls.append((sampling.seed, [p.index for s in shards for p in s.prompts]))
        batches = [make_batch([{"prompt_index": p.index, "sample_index": j, "response": f"{p.index}.{j}.{sampling.seed}"}
                               for p in s.prompts for j in range(self.n)]) for s in shards]
        return batches, PoolEvents(requeued_shards=1)


class FakeReward:
    def __init__(self, rewards: dict[int, list[float]]):
        self.rewards = rewards
        self.score = SimpleNamespace(options=lambda num_returns: SimpleNamespace(remote=self._score))

    def _score(self, *batches):
        b = RolloutBatch.concat(batches)
        scored = b.with_rewards(np.array([self.rewards[p][j] for p, j in b.keys()]), {})
        return scored, None


@pytest.fixture
def no_ray(monkeypatch):
    """The Ray task and ``ray.get`` of the rounds loop, run in-process."""
    task = SimpleNamespace(options=lambda num_returns: SimpleNamespace(remote=keep_informative))
    monkeypatch.setattr(rollouts, "_keep_informative", task)
    monkeypatch.setattr(rollouts, "ray", SimpleNamespace(get=lambda x: x))


def _setup(rounds: int, informative: set[int]):
    cfg = load_config("tiny", ["algo.estimator=grpo", "rollout.dynamic_sampling=true",
                               f"rollout.max_sampling_rounds={rounds}", "rollout.prompts_per_step=3",
                               "rollout.samples_per_prompt=2", "ppo.minibatch_size=6", "ppo.micro_batch_size=6"])
    prompts = [PromptItem(index=i, text=f"q{i}") for i in range(12)]
    rewards = {i: [0.0, 1.0] if i in informative else [0.5, 0.5] for i in range(12)}
    actors = SimpleNamespace(pool=FakePool(2), reward=FakeReward(rewards))
    return cfg, actors, PromptStream(prompts, seed=3)


def test_rounds_run_until_enough_informative_groups(no_ray):
    order = PromptStream([PromptItem(index=i, text="") for i in range(12)], seed=3).epoch_order(0)
    # Informative: the 2nd prompt of round 1, the 2nd of round 2, the 1st and 2nd of round 3 (one more
    # than wanted: the limit of 3 drops it).
    informative = {order[1], order[4], order[6], order[7]}
    cfg, actors, stream = _setup(rounds=3, informative=informative)
    out = rollouts.produce(cfg, actors, stream, step=2)
    step_seed = SamplingSpec.for_step(cfg.rollout, cfg.seed, 2).seed
    assert [c[0] for c in actors.pool.calls] == [step_seed, round_seed(step_seed, 1), round_seed(step_seed, 2)]
    assert [c[1] for c in actors.pool.calls] == [order[0:3], order[3:6], order[6:9]]
    assert out.sampling_rounds == 3 and out.discarded_groups == 5  # 2 + 2 + 1 zero-variance groups
    assert [k[0] for k in out.scored.keys()] == [order[1], order[1], order[4], order[4], order[6], order[6]]
    assert out.summary.count == 6 and out.events.requeued_shards == 3
    assert out.cursor == stream.state_dict() == {"epoch": 0, "position": 9}  # every round's prompts consumed
    assert set(out.seconds) == {"generate", "reward"}


def test_rounds_stop_early_and_keep_only_what_is_wanted(no_ray):
    order = PromptStream([PromptItem(index=i, text="") for i in range(12)], seed=3).epoch_order(0)
    cfg, actors, stream = _setup(rounds=3, informative=set(order[:5]))
    out = rollouts.produce(cfg, actors, stream, step=1)
    assert out.sampling_rounds == 1 and out.discarded_groups == 0 and len(actors.pool.calls) == 1
    assert [k[0] for k in out.scored.keys()[::2]] == order[:3]
    assert out.cursor == {"epoch": 0, "position": 3}


def test_rounds_run_out_with_nothing_informative(no_ray, caplog):
    cfg, actors, stream = _setup(rounds=2, informative=set())
    out = rollouts.produce(cfg, actors, stream, step=1)
    assert out.sampling_rounds == 2 and out.discarded_groups == 6 and out.summary.count == 6
    assert out.scored.keys() == [(p, j) for p in stream.epoch_order(0)[:3] for j in (0, 1)]  # the first round's
    assert "0 of 3 prompt groups with differing rewards after 2 sampling rounds" in caplog.text
    assert out.cursor == {"epoch": 0, "position": 6}


def test_without_dynamic_sampling_one_round_and_no_counts(no_ray):
    cfg, actors, stream = _setup(rounds=3, informative=set())
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"dynamic_sampling": False})})
    actors.reward.score = SimpleNamespace(options=lambda num_returns: SimpleNamespace(
        remote=lambda *b: (RolloutBatch.concat(b).with_rewards(np.zeros(6), {}), SimpleNamespace(count=6))))
    out = rollouts.produce(cfg, actors, stream, step=1)
    assert out.sampling_rounds is None and out.discarded_groups == 0 and len(actors.pool.calls) == 1
    assert actors.pool.calls[0][0] == SamplingSpec.for_step(cfg.rollout, cfg.seed, 1).seed


def test_pending_steps_keep_their_counts_in_the_checkpoint():
    from ray_rlhf.run.state import _pending_entry

    step = rollouts.StepRollouts(3, None, None, PoolEvents(), {}, seconds={"generate": 1.0},
                                 sampling_rounds=2, discarded_groups=5)
    assert _pending_entry(step) == {"step": 3, "seconds": {"generate": 1.0}, "sampling_rounds": 2,
                                    "discarded_groups": 5}
    step.sampling_rounds = None
    assert _pending_entry(step) == {"step": 3, "seconds": {"generate": 1.0}}
