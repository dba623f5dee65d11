"""Hand-made rollout batches for tests."""

from __future__ import annotations

from ray_rlhf.records import RolloutBatch


def make_batch(rows: list[dict]) -> RolloutBatch:
    """A :class:`RolloutBatch` from per-sequence dicts; missing fields get simple defaults.

    Keys: prompt_index, sample_index, prompt, response, prompt_ids, response_ids,
    sampler_logprobs, finish_reason, policy_version, generator_id, reward (None: unscored),
    reward_parts (dict name -> float), columns (dict name -> value).
    """
    def get(key, default):
        return [r.get(key, default(i, r)) for i, r in enumerate(rows)]

    response_ids = get("response_ids", lambda i, r: list(range(len(r.get("response", "r")))))
    batch = RolloutBatch.from_sequences(
        prompt_index=get("prompt_index", lambda i, r: i), sample_index=get("sample_index", lambda i, r: 0),
        prompt_ids=get("prompt_ids", lambda i, r: [0, 5]), response_ids=response_ids,
        sampler_logprobs=[r.get("sampler_logprobs", [-1.0] * len(ids)) for r, ids in zip(rows, response_ids)],
        prompt=get("prompt", lambda i, r: "Q:"), response=get("response", lambda i, r: "r"),
        finish_reason=get("finish_reason", lambda i, r: "stop"),
        policy_version=get("policy_version", lambda i, r: 0), generator_id=get("generator_id", lambda i, r: "g"),
        columns={k: [r["columns"][k] for r in rows] for k in (rows[0].get("columns") or {})},
        reward=[float("nan") if r.get("reward") is None else r["reward"] for r in rows],
    )
    parts = sorted({k for r in rows for k in r.get("reward_parts", {})})
    if parts:
        import numpy as np

        batch.reward_parts = {k: np.array([r["reward_parts"][k] for r in rows]) for k in parts}
    return batch


def sequences(batch: RolloutBatch) -> list:
    """Per-sequence views of a batch (slow, for assertions): objects with ``key``, ``prompt_ids``,
    ``response_ids``, ``sampler_logprobs``, ``finish_reason``, ``truncated``, ``policy_version``, ``generator_id``,
    ``prompt``, ``response``, ``reward``."""
    from types import SimpleNamespace

    out = []
    for i in range(len(batch)):
        p0, p1 = batch.prompt_offsets[i], batch.prompt_offsets[i + 1]
        r0, r1 = batch.response_offsets[i], batch.response_offsets[i + 1]
        out.append(SimpleNamespace(
            key=(int(batch.prompt_index[i]), int(batch.sample_index[i])), prompt_index=int(batch.prompt_index[i]),
            prompt_ids=batch.prompt_ids[p0:p1].tolist(), response_ids=batch.response_ids[r0:r1].tolist(),
            sampler_logprobs=batch.sampler_logprobs[r0:r1].tolist(), finish_reason=str(batch.finish_reason[i]),
            truncated=bool(batch.truncated[i]),
            policy_version=int(batch.policy_version[i]), generator_id=str(batch.generator_id[i]),
            prompt=batch.prompt[i], response=batch.response[i], reward=float(batch.reward[i])))
    return out
