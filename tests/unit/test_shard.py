"""A generator's shard bookkeeping without an engine: the batch of rows, request seeds, CPU binding."""

import numpy as np
import pytest

from ray_rlhf.errors import UserError
from ray_rlhf.generation.shard import bind_cpus, request_seed, shard_batch
from ray_rlhf.records import PromptItem, PromptShard


def _shard():
    return PromptShard(3, (PromptItem(7, "p7", (1, 2, 3), {"answer": "a"}), PromptItem(9, "p9", (4,), {"answer": "b"})))


def test_shard_batch_lays_rows_out_flat_with_offsets():
    shard = _shard()
    p7, p9 = shard.prompts
    rows = [(p7, 0, [10, 11], [-0.5, -0.25], "stop", "x"), (p7, 1, [12], [-1.0], "length", "y"),
            (p9, 0, [], [], "length", "")]
    batch = shard_batch(shard, rows, [2, 3, 3], "g0", token_versions=[[2, 3], [3], []])
    assert len(batch) == 3
    assert batch.prompt_index.tolist() == [7, 7, 9] and batch.sample_index.tolist() == [0, 1, 0]
    assert batch.prompt_offsets.tolist() == [0, 3, 6, 7] and batch.prompt_ids.tolist() == [1, 2, 3, 1, 2, 3, 4]
    assert batch.response_offsets.tolist() == [0, 2, 3, 3] and batch.response_ids.tolist() == [10, 11, 12]
    np.testing.assert_array_equal(batch.sampler_logprobs, np.array([-0.5, -0.25, -1.0], np.float32))
    assert batch.policy_version.tolist() == [2, 3, 3] and batch.token_versions.tolist() == [2, 3, 3]
    assert batch.finish_reason.tolist() == ["stop", "length", "length"] and batch.generator_id.tolist() == ["g0"] * 3
    assert batch.columns == {"answer": ["a", "a", "b"]} and batch.response == ["x", "y", ""]
    assert np.isnan(batch.reward).all()


def test_shard_batch_one_version_for_all_rows_and_no_token_versions():
    shard = _shard()
    batch = shard_batch(shard, [(shard.prompts[1], 0, [5], [-0.1], "stop", "z")], 4, "g1")
    assert batch.policy_version.tolist() == [4] and batch.token_versions is None


def test_shard_batch_refuses_logprobs_that_do_not_match_the_tokens():
    shard = _shard()
    with pytest.raises(RuntimeError, match="1 logprobs for 2 tokens"):
        shard_batch(shard, [(shard.prompts[0], 0, [5, 6], [-0.1], "stop", "z")], 0, "g0")


def test_request_seed_depends_on_base_and_prompt_only():
    assert request_seed(None, 3) is None
    assert request_seed(1, 3) == request_seed(1, 3) != request_seed(1, 4)
    assert request_seed(1, 3) != request_seed(2, 3)
    assert 0 <= request_seed(1, 3) < 2**31 - 2**16


def test_bind_cpus_refuses_a_malformed_core_list(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)  # restored after the test
    with pytest.raises(UserError, match="omp_threads_bind='0-x'"):
        bind_cpus("0-x")
