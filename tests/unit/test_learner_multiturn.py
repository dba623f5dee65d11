"""The learner on multi-turn rows (tiny model, CPU): the tokens the environment inserted between
the model's turns (loss mask 0) are attended but get no loss, gradient, KL, advantage or value
target; single-turn rows train exactly as before."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ray_rlhf.config.schema import AlgoConfig, KLConfig, PPOConfig
from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.engine import Micro
from ray_rlhf.learning.learner import Learner, LearnerOptions
from ray_rlhf.learning.objectives.ppo import PPOObjective
from ray_rlhf.records import RolloutBatch

# m = model token, o = observation token; 2 groups of 2 samples
LOSS_MASKS = [[1, 1, 1, 0, 0, 1, 1],  # m m m o o m m
              [1, 1, 0, 1],           # m m o m
              [1, 1, 1, 1, 1],        # single turn
              [1, 0, 0, 0, 1, 1]]     # m o o o m m
OBSERVATIONS = 2 + 1 + 0 + 3
PPO = PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=4, ent_coef=0.01)
KL = KLConfig(beta=0.1)


def multiturn(loss_masks=LOSS_MASKS, obs_logprob=-0.5, obs_reward=0.0) -> RolloutBatch:
    """Turn 1 of row 0 earns 0.5 on its last model token; ``obs_logprob`` / ``obs_reward`` fill
    the observation tokens' sampler log-probs and turn rewards (which must not matter)."""
    responses = [[(7 * i + 3 * j) % 50 + 3 for j in range(len(m))] for i, m in enumerate(LOSS_MASKS)]
    logprobs = [[-0.5 if k else obs_logprob for k in m] for m in LOSS_MASKS]
    turns = [[0.0 if k else obs_reward for k in m] for m in LOSS_MASKS]
    turns[0][2] = 0.5
    return RolloutBatch.from_sequences(
        prompt_index=[0, 0, 1, 1], sample_index=[0, 1, 0, 1], prompt_ids=[[5, 6, 7], [5, 6, 7], [9, 4], [9, 4]],
        response_ids=responses, sampler_logprobs=logprobs, prompt=["p"] * 4, response=["r"] * 4,
        finish_reason=["stop"] * 4, policy_version=0, reward=[1.0, 0.0, 0.5, 1.0], loss_mask=loss_masks,
        token_reward=turns)


@pytest.fixture(scope="module")
def learner(tiny_policy_path):
    """GAE with a critic and the KL in the loss: every term of the loss acts."""
    return Learner(str(tiny_policy_path), PPO, KL, seed=0, options=LearnerOptions(kl_in_loss=True))


def _holes(batch) -> torch.Tensor:
    return batch.response_mask.bool() & ~batch.loss_mask.bool()


def test_observation_tokens_get_no_gradient_from_any_loss_term(learner):
    """d loss / d (logprob, value, entropy) is exactly 0 at every observation token and not 0 at
    the model's tokens (policy, value, KL and entropy terms all active)."""
    prep, stats = learner.prepare(collate(multiturn(), learner.pad_id))
    holes = _holes(prep.batch)
    assert stats["observation_tokens"] == OBSERVATIONS == int(holes.sum())
    assert not prep.advantages[holes].any() and not prep.returns[holes].any()
    g = torch.Generator().manual_seed(0)
    leaves = {"logprobs": (prep.old_logprobs + 0.3 * torch.randn(prep.old_logprobs.shape, generator=g)),
              "values": torch.randn(prep.old_logprobs.shape, generator=g),
              "entropy": torch.rand(prep.old_logprobs.shape, generator=g)}
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    real = prep.batch.train_mask.sum()
    loss, _ = learner.objective.loss(Micro(prep, False, len(prep.batch), real), lambda b, **_: SimpleNamespace(**leaves))
    loss.backward()
    model = prep.batch.train_mask.bool()
    for name, leaf in leaves.items():
        assert torch.equal(leaf.grad[holes], torch.zeros(int(holes.sum()))), name
        assert leaf.grad[model].abs().sum() > 0, name


def _loss(objective: PPOObjective, learner: Learner, batch: RolloutBatch):
    prep, stats = objective.prepare(collate(batch, learner.pad_id), learner.engine)
    with torch.no_grad():
        loss, _ = objective.loss(Micro(prep, False, len(prep.batch), prep.batch.train_mask.sum()),
                                 learner.engine.forward)
    return prep, stats, loss


def test_observation_tokens_logprobs_and_rewards_change_nothing(learner):
    """The sampler's log-probs at observation tokens (pi_old itself with ``ppo.old_logprobs=sampler``)
    and rewards misplaced on them: the advantages, returns, the KL to the reference and the loss are
    the same. The overlong penalty counts the longest model turn: 3, 2, 5 and 2 tokens against a
    budget of 4 with a buffer of 2 -> -0.5, 0, -1, 0 (the full lengths 7, 4, 5, 6 would give -1, 0,
    -1, -1)."""
    objective = PPOObjective(PPO, KL, AlgoConfig(), old_logprobs_from_sampler=True, kl_in_loss=False,
                             overlong="penalty", response_budget=4, overlong_buffer=2)
    prep_a, stats_a, loss_a = _loss(objective, learner, multiturn())
    prep_b, stats_b, loss_b = _loss(objective, learner, multiturn(obs_logprob=-7.0, obs_reward=3.0))
    assert not torch.equal(prep_a.old_logprobs, prep_b.old_logprobs)  # they did differ, at the holes
    assert torch.equal(prep_a.advantages, prep_b.advantages) and torch.equal(prep_a.returns, prep_b.returns)
    assert torch.equal(loss_a, loss_b)
    assert stats_a.to_dict() == stats_b.to_dict()
    assert stats_a["overlong_penalty_mean"] == pytest.approx(-1.5 / 4)


def test_single_turn_rows_train_as_before(learner):
    """A loss mask of ones is no loss mask: the same tensors, statistics and loss; no observation tokens."""
    ones = [[1] * len(m) for m in LOSS_MASKS]
    plain = dataclasses.replace(multiturn(ones), loss_mask=None, token_reward=None)
    a, b = collate(plain, learner.pad_id), collate(multiturn(ones), learner.pad_id)
    b.token_rewards.zero_()  # row 0's turn reward aside
    for f in dataclasses.fields(a):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    assert torch.equal(a.train_mask, a.response_mask)
    prep, stats, loss = _loss(learner.objective, learner, plain)
    assert stats["observation_tokens"] == 0 and torch.isfinite(loss)


def test_a_step_on_multi_turn_rows(learner):
    stats = learner.step(multiturn())
    m = stats.metrics()
    assert m["ppo/observation_tokens"] == OBSERVATIONS
    assert m["ppo/response_tokens"] == sum(len(x) for x in LOSS_MASKS)
    assert all(np.isfinite(m[k]) for k in ("ppo/policy_loss", "ppo/value_loss", "ppo/kl_loss", "ppo/entropy"))
