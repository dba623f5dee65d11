"""rollout.partial bookkeeping on a fake engine: segments concatenate, budgets shrink, seeds derive.

The fake engine samples one token per live request per step: token ``100 * version + position in
the segment``, log-prob ``-version - 0.5``, so each token says which weights sampled it. A
request whose prompt ends in an EOS-trigger stops there. The mailbox "loads" a version by
changing what the engine samples with.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ray_rlhf.generation.partial import Resumable, generate_interruptible, segment_seed
from ray_rlhf.records import RolloutBatch, rollout_batch_from_arrow

EOS = 7


class FakeEngine:
    """``add_request`` / ``step`` / ``abort_request`` / ``reset_prefix_cache`` of vLLM's engine, CUMULATIVE outputs."""

    def __init__(self, stop_after: dict[int, int] | None = None):
        self.version = 0
        self.live: dict[str, dict] = {}
        self.added: list[tuple[list[int], int, int | None]] = []  # (prompt, max_tokens, seed) of each add
        self.aborted: list[str] = []
        self.resets = 0
        self.stop_after = stop_after or {}  # prompt's first id -> EOS at this many response tokens in total

    def add_request(self, rid, prompt, params):
        self.added.append((list(prompt), params.max_tokens, params.seed))
        self.live[rid] = dict(prompt=list(prompt), params=params, tokens=[], lps=[])

    def step(self):
        outs = []
        for rid, r in list(self.live.items()):
            total = len(r["prompt"]) - r["params"].plen + len(r["tokens"])  # response tokens so far, all segments
            stop = self.stop_after.get(r["prompt"][0])
            tok = EOS if stop is not None and total + 1 == stop else 100 * self.version + len(r["tokens"])
            r["tokens"].append(tok)
            r["lps"].append(-self.version - 0.5)
            finished = tok == EOS or len(r["tokens"]) == r["params"].max_tokens
            reason = "stop" if tok == EOS else "length"
            c = SimpleNamespace(token_ids=list(r["tokens"]), logprobs=SimpleNamespace(logprobs=list(r["lps"])),
                                finish_reason=reason if finished else None, text=f"text-{rid}")
            outs.append(SimpleNamespace(request_id=rid, outputs=[c], finished=finished))
            if finished:
                del self.live[rid]
        return outs

    def abort_request(self, rids):
        self.aborted += rids
        for rid in rids:
            del self.live[rid]

    def reset_prefix_cache(self):
        self.resets += 1


class FakeMailbox:
    """Delivers ``version`` to ``engine`` once ``engine`` has taken ``after_steps`` steps (counted by the poll)."""

    def __init__(self, engine: FakeEngine, deliveries: dict[int, int]):
        self.engine, self.deliveries, self.polls = engine, dict(deliveries), 0

    def pending(self) -> bool:
        self.polls += 1
        return any(self.polls >= at for at in self.deliveries)

    def load_delivered(self) -> int:
        at = min(a for a in self.deliveries if self.polls >= a)
        self.engine.version = self.deliveries.pop(at)
        return self.engine.version


def _run(engine, mailbox, prompts, max_tokens, seed=11):
    reqs = [Resumable(list(p), max_tokens, None if seed is None else seed + i, 0) for i, p in enumerate(prompts)]

    def params_for(r):
        return SimpleNamespace(max_tokens=r.remaining, seed=r.seed_now, plen=len(r.prompt_ids))

    stats = generate_interruptible(engine, reqs, params_for, mailbox, lambda: engine.version, lambda ids: ids)
    return reqs, stats


def test_interruption_concatenates_tokens_logprobs_versions():
    # Two prompts, 5 tokens each; version 1 arrives after the 2nd engine step (polls: 1 before any
    # step, then one per step), so each sequence has 2 tokens of version 0, then 3 of version 1.
    engine = FakeEngine()
    reqs, stats = _run(engine, FakeMailbox(engine, {3: 1}), [[1, 2], [3]], max_tokens=5)
    assert stats.interruptions == 1 and engine.resets == 1 and len(engine.aborted) == 2
    for r in reqs:
        assert r.tokens == [0, 1, 100, 101, 102]  # segment 0: 100*0 + 0..1; segment 1: 100*1 + 0..2
        assert r.versions == [0, 0, 1, 1, 1]
        assert r.logprobs == [-0.5, -0.5, -1.5, -1.5, -1.5]
        assert r.start_version == 0 and r.finish_reason == "length" and r.segments == 1
        assert r.text is None  # interrupted: the caller decodes all tokens
    # the resumed requests: prompt + the 2 tokens so far, 3 tokens of budget, a derived seed
    resumed = engine.added[2:]
    assert resumed == [([1, 2, 0, 1], 3, segment_seed(11, 1)), ([3, 0, 1], 3, segment_seed(12, 1))]
    assert segment_seed(11, 1) not in (11, 12, None) and segment_seed(11, 0) == 11 and segment_seed(None, 3) is None


def test_finished_before_the_switch_is_not_resumed_and_keeps_its_text():
    # Prompt [5] stops on EOS at its 2nd token, in the step before the switch; prompt [9] runs on.
    engine = FakeEngine(stop_after={5: 2})
    reqs, stats = _run(engine, FakeMailbox(engine, {3: 1}), [[5], [9]], max_tokens=4)
    done, cont = reqs
    assert done.tokens == [0, EOS] and done.versions == [0, 0] and done.finish_reason == "stop"
    assert done.text is not None and done.segments == 0
    assert cont.tokens == [0, 1, 100, 101] and cont.versions == [0, 0, 1, 1] and cont.finish_reason == "length"
    assert len(engine.added) == 3  # two first segments, one resumed request


def test_stop_after_resume_and_two_switches():
    # Versions 1 and 2 arrive after steps 1 and 3; the sequence stops on EOS as its 5th token.
    engine = FakeEngine(stop_after={4: 5})
    reqs, stats = _run(engine, FakeMailbox(engine, {2: 1, 4: 2}), [[4]], max_tokens=8)
    (r,) = reqs
    assert stats.interruptions == 2 and r.segments == 2
    assert r.versions == [0, 1, 1, 2, 2] and r.tokens == [0, 100, 101, 200, EOS]
    assert r.finish_reason == "stop" and len(r.tokens) <= 8
    assert [a[1] for a in engine.added] == [8, 7, 5]  # the budget shrinks by the tokens already sampled


def test_weights_delivered_before_the_first_step_are_loaded_first():
    engine = FakeEngine()
    reqs, stats = _run(engine, FakeMailbox(engine, {1: 3}), [[1]], max_tokens=2, seed=None)
    (r,) = reqs
    assert stats.interruptions == 0 and stats.loads == 1
    assert r.start_version == 3 and r.versions == [3, 3] and engine.added[0][2] is None


def test_token_versions_through_concat_select_and_parquet():
    def batch(pidx, versions, start):
        return RolloutBatch.from_sequences(
            prompt_index=pidx, sample_index=[0] * len(pidx), prompt_ids=[[1]] * len(pidx),
            response_ids=[[5] * len(v) for v in versions], sampler_logprobs=[[-1.0] * len(v) for v in versions],
            prompt=["p"] * len(pidx), response=["r"] * len(pidx), finish_reason=["stop"] * len(pidx),
            policy_version=start, token_versions=versions, reward=[0.0] * len(pidx))

    a, b = batch([0, 1], [[0, 0, 1], [1]], [0, 1]), batch([2], [[2, 2]], [2])
    cat = RolloutBatch.concat([a, b])
    np.testing.assert_array_equal(cat.token_versions, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(cat.interrupted, [True, False, False])
    sel = cat.select([2, 0])
    np.testing.assert_array_equal(sel.token_versions, [2, 2, 0, 0, 1])
    back = rollout_batch_from_arrow(cat.to_arrow(step=3))
    np.testing.assert_array_equal(back.token_versions, cat.token_versions)
    assert "token_versions" not in back.columns
    plain = batch([0], [[0]], [0])
    plain.token_versions = None
    mixed = RolloutBatch.concat([plain, b])  # a batch without per-token versions: its sequence's version
    np.testing.assert_array_equal(mixed.token_versions, [0, 2, 2])
    with pytest.raises(ValueError, match="token_versions"):
        batch([0], [[0, 1]], [0]).__class__(**{**a.__dict__, "token_versions": np.zeros(1, np.int64)})


class FakeWeightsEngine:
    """The receiver's :class:`~ray_rlhf.sync.receiver.Engine`: ``reload`` stores, ``read_back`` returns what it holds."""

    def __init__(self, state):
        self.state = dict(state)

    def reload(self, weights):
        self.state = {n: t.clone() for n, t in weights}

    def read_back(self, part=0, parts=1, sample=None):
        return dict(self.state)


def test_the_mailbox_keeps_the_newest_delivery_and_verifies_what_it_loads():
    import torch

    from ray_rlhf.sync.checksum import state_dict_checksum
    from ray_rlhf.sync.receiver import WeightReceiver
    from ray_rlhf.sync.types import WeightSyncError

    v0 = {"w": torch.zeros(3)}
    receiver = WeightReceiver(FakeWeightsEngine(v0), "gen-0", {"w"})
    assert not receiver.pending()
    v1, v2 = {"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}
    receiver.deliver(2, v2, state_dict_checksum(v2))
    receiver.deliver(1, v1, state_dict_checksum(v1))  # older than the waiting one: ignored
    assert receiver.pending() and receiver.version == 0  # delivered, not loaded: the engine is untouched
    assert receiver.load_delivered() == 2 and torch.equal(receiver.engine.state["w"], v2["w"])
    assert not receiver.pending() and receiver.load_delivered() == 2  # nothing waits: no load
    receiver.deliver(2, v1, state_dict_checksum(v1))  # not newer than what the engine holds: ignored
    assert not receiver.pending()
    receiver.deliver(3, v1, "a-checksum-the-payload-does-not-have")
    with pytest.raises(WeightSyncError, match="generator gen-0 received weights with checksum"):
        receiver.load_delivered()
