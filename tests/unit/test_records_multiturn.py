"""The multi-turn fields of RolloutBatch (loss_mask, token_reward) and their tensors in collate."""

import numpy as np
import pytest
import torch

from ray_rlhf.learning.batch import collate
from ray_rlhf.records import RolloutBatch, rollout_batch_from_arrow


def _batch(loss_mask=None, token_reward=None, responses=((5, 6, 7, 8, 9), (3,))):
    n = len(responses)
    return RolloutBatch.from_sequences(
        prompt_index=list(range(n)), sample_index=[0] * n, prompt_ids=[[1, 2]] * n, response_ids=responses,
        sampler_logprobs=[[-0.5] * len(r) for r in responses], prompt=["p"] * n, response=["r"] * n,
        finish_reason=["stop"] * n, policy_version=0, reward=[1.0] * n, loss_mask=loss_mask,
        token_reward=token_reward)


def test_single_turn_rows_are_all_model_tokens():
    b = _batch()
    assert b.loss_mask is None and b.model_mask.tolist() == [1] * 6
    assert b.token_rewards.tolist() == [0.0] * 6
    assert b.turn_count.tolist() == [1, 1]


def test_turns_are_runs_of_model_tokens_and_never_cross_rows():
    # row 0: model 5 6 | obs 7 | model 8 9 -> 2 turns; row 1: one model token -> 1 turn
    b = _batch(loss_mask=[[1, 1, 0, 1, 1], [1]], token_reward=[[0, 0.5, 0, 0, 0], [0]])
    assert b.turn_count.tolist() == [2, 1]
    # row 0 ends on a model token and row 1 starts with one: still separate turns of separate rows
    b2 = _batch(loss_mask=[[1, 1, 1, 1, 1], [1]])
    assert b2.turn_count.tolist() == [1, 1]
    assert _batch(loss_mask=[[1, 0], []], responses=((5, 6), ())).turn_count.tolist() == [1, 0]


def test_select_concat_and_the_rollout_log_carry_the_fields():
    b = _batch(loss_mask=[[1, 1, 0, 1, 1], [1]], token_reward=[[0, 0.5, 0, 0, 0], [0]])
    s = b.select([1, 0])
    assert s.loss_mask.tolist() == [1, 1, 1, 0, 1, 1]
    assert s.token_reward.tolist() == [0, 0, 0.5, 0, 0, 0]
    c = RolloutBatch.concat([_batch(), b])  # a single-turn batch beside a multi-turn one: all ones there
    assert c.loss_mask.tolist() == [1] * 6 + [1, 1, 0, 1, 1, 1]
    assert c.token_reward.tolist() == [0] * 6 + [0, 0.5, 0, 0, 0, 0]
    assert RolloutBatch.concat([_batch(), _batch()]).loss_mask is None
    back = rollout_batch_from_arrow(b.to_arrow(step=3))
    assert back.loss_mask.tolist() == b.loss_mask.tolist() and back.token_reward.tolist() == b.token_reward.tolist()
    assert "loss_mask" not in _batch().to_arrow(step=0).column_names
    assert rollout_batch_from_arrow(_batch().to_arrow(step=0)).loss_mask is None


def test_a_mask_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="loss_mask has 5 entries"):
        RolloutBatch(**{**_batch().__dict__, "loss_mask": np.ones(5, np.int8)})


def test_collate_loss_mask_excludes_observation_tokens_and_padding():
    t = collate(_batch(loss_mask=[[1, 1, 0, 1, 1], [1]], token_reward=[[0, 0.5, 0, 0, 0], [0]]), pad_id=0)
    assert t.response_mask.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]  # attention: every real token
    assert t.loss_mask.tolist() == [[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]]
    assert torch.equal(t.token_rewards, torch.tensor([[0, 0.5, 0, 0, 0], [0, 0, 0, 0, 0]]))
    single = collate(_batch(), pad_id=0)
    assert torch.equal(single.loss_mask, single.response_mask)
