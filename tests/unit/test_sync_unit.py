"""Weight-sync pieces that need neither Ray nor vLLM: flat buffers, checksums, verify, and the
sender's and receiver's methods reached through ``sync.remote.call`` (a stand-in actor handle)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ray_rlhf.sync.broadcaster import compare_checksums
from ray_rlhf.sync.checksum import canonical, state_dict_checksum, tensor_bytes
from ray_rlhf.sync.flat import FlatLayout, flatten, layout_of, unflatten
from ray_rlhf.sync.receiver import WeightReceiver
from ray_rlhf.sync.remote import call
from ray_rlhf.sync.sender import WeightSender
from ray_rlhf.sync.types import EngineChecksum, SinkInfo, SyncResult, WeightSyncError


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
        "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(8, 4, generator=g),
        "step": torch.tensor(3, dtype=torch.int64),  # 0-d, other dtype
    }


def test_flatten_unflatten_round_trip():
    state = _state()
    layout, bufs = flatten(state)
    # One buffer per dtype: float32 holds 8*4 + 4*4 + 8*4 = 80 elements, bfloat16 4, int64 1.
    assert {d: b.numel() for d, b in bufs.items()} == {"float32": 80, "bfloat16": 4, "int64": 1}
    assert layout.nbytes == 80 * 4 + 4 * 2 + 8 == tensor_bytes(state)
    # Offsets are contiguous within a dtype, in insertion order.
    f32 = [e for e in layout.entries if e.dtype == "float32"]
    assert [e.offset for e in f32] == [0, 32, 48]
    back = dict(unflatten(FlatLayout.from_json(layout.to_json()), bufs))
    assert list(back) == list(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)
    # Views, not copies: the receiver's buffers are reused next sync.
    assert back["lm_head.weight"].data_ptr() == bufs["float32"][48:].data_ptr()


def test_flatten_against_layout_rejects_a_different_model():
    layout = layout_of(_state())
    other = dict(_state())
    other["lm_head.weight"] = torch.zeros(9, 4)
    with pytest.raises(ValueError, match="lm_head.weight"):
        flatten(other, layout)
    del other["lm_head.weight"]
    with pytest.raises(ValueError, match="missing"):
        flatten(other, layout)


def test_checksum_stable_across_dict_order_and_pair_lists():
    state = _state()
    reordered = dict(reversed(list(state.items())))
    assert state_dict_checksum(state) == state_dict_checksum(reordered) == state_dict_checksum(list(state.items()))
    assert state_dict_checksum(state) == state_dict_checksum({k: v.clone() for k, v in state.items()})


def test_checksum_changes_when_any_single_element_changes():
    state = _state()
    base = state_dict_checksum(state)
    for name, t in state.items():
        for i in range(t.numel()):
            changed = dict(state)
            flat = t.clone().reshape(-1)
            flat[i] += 1  # +1 is exact for every value here (|x| < 10, float32/bf16/int64)
            changed[name] = flat.reshape(t.shape)
            assert state_dict_checksum(changed) != base, (name, i)


def test_checksum_sees_names_dtypes_shapes_and_missing_tensors():
    state = _state()
    base = state_dict_checksum(state)
    renamed = {("x." + k if k == "lm_head.weight" else k): v for k, v in state.items()}
    recast = {**state, "lm_head.weight": state["lm_head.weight"].double()}
    reshaped = {**state, "lm_head.weight": state["lm_head.weight"].reshape(4, 8)}
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    assert len({base, *(state_dict_checksum(s) for s in (renamed, recast, reshaped, missing))}) == 5


def test_checksum_ignores_rotary_inv_freq_and_merges_zero_encodings():
    state = _state()
    with_inv_freq = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    assert state_dict_checksum(with_inv_freq) == state_dict_checksum(state)
    # -0.0 vs +0.0 and a float32 subnormal vs 0: same number to a GEMM kernel with flush-to-zero.
    a = torch.tensor([0.0, 1.0, 1e-45])
    b = torch.tensor([-0.0, 1.0, 0.0])
    assert torch.equal(canonical(a), torch.tensor([0.0, 1.0, 0.0]))
    assert state_dict_checksum({"w": a}) == state_dict_checksum({"w": b})


def test_verify_names_the_generator_and_what_failed():
    ok = EngineChecksum(("w",), "abc")
    g0, g1 = SinkInfo("g0", 3, "abc"), SinkInfo("g1", 3, "abc")
    compare_checksums(3, "abc", [g0, g1], [ok, ok])  # received = learner's, engines read back what they got
    with pytest.raises(WeightSyncError, match="generator g1 holds version 2, expected 3"):
        compare_checksums(3, "abc", [g0, SinkInfo("g1", 2, "abc")], [ok, ok])
    with pytest.raises(WeightSyncError, match=r"generator g1 received weights with checksum xyz != learner checksum abc"):
        compare_checksums(3, "abc", [g0, SinkInfo("g1", 3, "xyz")], [ok, ok])
    with pytest.raises(WeightSyncError, match=r"generator g1 engine computes with 1 tensor\(s\) .* \(w\)"):
        compare_checksums(3, "abc", [g0, g1], [ok, EngineChecksum(("w",), "zzz", ("w",))])
    # version 0: nothing received; the engine's full read-back must be the learner's initial model
    compare_checksums(0, "abc", [SinkInfo("g0", 0, "")], [ok])
    with pytest.raises(WeightSyncError, match="at version 0"):
        compare_checksums(0, "abc", [SinkInfo("g0", 0, "")], [EngineChecksum(("w",), "zzz")])


def test_sync_result_is_a_plain_record():
    r = SyncResult(version=1, backend="object_store", bytes=10, seconds=0.5, num_generators=2)
    assert r.checksum == "" and r.verify_seconds == 0.0


def _actor(component) -> SimpleNamespace:
    """A stand-in Ray actor handle whose ``__ray_call__.remote(fn, *args)`` runs ``fn(actor, *args)``
    in-process (Ray runs it in the actor and returns an ObjectRef of the result)."""
    actor = SimpleNamespace(weights=component)
    return SimpleNamespace(__ray_call__=SimpleNamespace(remote=lambda fn, *a, **k: fn(actor, *a, **k)))


class _DictEngine:
    """An :class:`~ray_rlhf.sync.receiver.Engine` that holds a state dict."""

    def __init__(self, state):
        self.state = dict(state)

    def reload(self, weights):
        self.state.update(dict(weights))

    def read_back(self, part=0, parts=1, sample=None):
        return dict(self.state)


def test_call_runs_the_components_method_in_the_actor():
    learner_state = _state(1)
    source = _actor(WeightSender(lambda: learner_state))
    exported = call(source, WeightSender.export)
    pairs = dict(exported.pairs())  # a copy in flat byte buffers, not the learner's tensors
    assert pairs.keys() == learner_state.keys() and exported.nbytes == tensor_bytes(learner_state)
    assert all(torch.equal(pairs[k], t) and pairs[k].dtype == t.dtype and pairs[k].data_ptr() != t.data_ptr()
               for k, t in learner_state.items())
    assert call(source, WeightSender.checksum) == state_dict_checksum(learner_state)
    assert call(source, WeightSender.checksum, ("lm_head.weight",)) == state_dict_checksum(learner_state, ["lm_head.weight"])

    engine = _DictEngine(_state(0))
    sink = _actor(WeightReceiver(engine, "g0", set(engine.state)))
    report = call(sink, WeightReceiver.load, 4, exported, True)
    assert (report.version, report.bytes, report.received_checksum) == (4, exported.nbytes,
                                                                          state_dict_checksum(learner_state))
    status = call(sink, WeightReceiver.status)
    read = call(sink, WeightReceiver.engine_checksum, 0, 1)
    compare_checksums(4, call(source, WeightSender.checksum), [status], [read])  # verify passes
    with pytest.raises(WeightSyncError, match="generator g0: version 5 payload is missing"):
        call(sink, WeightReceiver.load, 5, {k: v for k, v in pairs.items() if k != "lm_head.weight"})


def test_sample_digests_are_the_digests_of_one_column_and_one_row():
    from ray_rlhf.sync.checksum import sample_digests, tensor_digests

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    got = sample_digests({"w": t, "b": torch.ones(4), "rotary_emb.inv_freq": torch.ones(2, 2)}, 9)
    assert set(got) == {"w"}  # 2-D tensors only, ignored names skipped
    col, row = got["w"]
    assert col == tensor_digests({"x": t[:, 1:2].clone()})["x"]  # 9 % 4 columns
    assert row == tensor_digests({"x": t[0:1, :].clone()})["x"]  # 9 % 3 rows
    assert col != tensor_digests({"x": t[:, 2:3].clone()})["x"]


class _SampledEngine(_DictEngine):
    """Holds a state dict; a rotating read-back returns part 0's tensors in full and one sampled
    column of the others (what vLLM's CPU read-back does for packed layers)."""

    def read_back(self, part=0, parts=1, sample=None):
        out = {}
        for i, (n, t) in enumerate(sorted(self.state.items())):
            if parts == 1 or i % parts == part:
                out[n] = t
            elif sample is not None and t.dim() == 2:
                j = sample % t.shape[1]
                out[n + "@sample"] = t[:, j : j + 1]
        return out


def test_a_rotating_read_back_compares_the_sampled_columns_with_the_received_tensors():
    learner = _state(1)
    engine = _SampledEngine(learner)
    sink = WeightReceiver(engine, "g0", set(learner))
    sink.load(3, learner)
    good = sink.engine_checksum(0, 2)
    assert good.sampled and not good.mismatched and set(good.names) | set(good.sampled) <= set(learner)
    stale = {k: v + 1 for k, v in learner.items()}
    sink.load(4, stale)  # received version 4; the engine stays on version 3's tensors
    engine.state = dict(learner)
    bad = sink.engine_checksum(0, 2)
    assert set(bad.mismatched) == set(bad.names) | set(bad.sampled)


def test_received_fingerprints_equal_the_three_separate_passes():
    from ray_rlhf.sync.checksum import received_fingerprints, sample_digests, tensor_digests

    state = {**_state(2), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2), "empty": torch.zeros(0, 4)}
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = -0.0
    checksum, digests, samples = received_fingerprints(list(state.items()), 7)
    assert checksum == state_dict_checksum(state)
    assert digests == tensor_digests({k: v for k, v in state.items() if not k.endswith("inv_freq")})
    assert samples == sample_digests(state, 7)
    assert received_fingerprints(state)[2] == {}


def test_a_flat_payload_survives_rays_serialisation_read_only():
    """The export as Ray ships it: pickled with out-of-band buffers, mapped back read-only; the
    pairs equal the state dict, bfloat16 and integer tensors included."""
    import pickle

    from ray_rlhf.sync.flat import FlatPayload

    state = _state(3)
    payload = FlatPayload.of(state)
    bufs = []
    data = pickle.dumps(payload, protocol=5, buffer_callback=bufs.append)
    assert len(bufs) == len(state_dtypes := {str(t.dtype) for t in state.values()}) == 3, state_dtypes
    back = pickle.loads(data, buffers=[memoryview(b.raw()).toreadonly() for b in bufs])
    assert not any(a.flags.writeable for a in back.buffers.values())
    got = dict(back.pairs())
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], t) and got[k].dtype == t.dtype and got[k].shape == t.shape for k, t in state.items())
    assert state_dict_checksum(got) == state_dict_checksum(state)
