"""``lora.sync=adapter`` without Ray or vLLM: the learner's adapter payload (tensors, config,
probe), its PEFT folder, the generator's checks (read-back checksum, probe log-probs, a stale
adapter) and the config's refusals."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from ray_rlhf.config import load_config
from ray_rlhf.config.training import VLLM_LORA_RANKS, engine_lora_rank
from ray_rlhf.errors import UserError
from ray_rlhf.learning.loading import load_causal_lm
from ray_rlhf.learning.lora import Adapters, LoraSpec
from ray_rlhf.sync.adapter import (
    LOGPROB_ATOL,
    AdapterPayload,
    adapter_checksum,
    probe_check,
    probe_token_ids,
    read_peft_dir,
    write_peft_dir,
)
from ray_rlhf.sync.broadcaster import compare_checksums
from ray_rlhf.sync.receiver import WeightReceiver
from ray_rlhf.sync.types import WeightSyncError


@pytest.fixture()
def adapters(tiny_policy_path) -> Adapters:
    return Adapters(load_causal_lm(str(tiny_policy_path), "cpu"), LoraSpec(rank=8, alpha=32.0))


def _train_b(adapters: Adapters, seed: int) -> None:
    """Stand-in for an update: B random (an adapter that changes the model)."""
    g = torch.Generator().manual_seed(seed)
    for layer in adapters.layers().values():
        b = layer.lora_B["default"].weight
        b.data.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _base_logprobs(lm, ids) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        return torch.log_softmax(lm(input_ids=x).logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None])[:, 0]


def test_payload_holds_the_adapters_alone_their_config_and_the_probe(adapters):
    p = adapters.payload()
    assert p.tensors and all(".lora_A." in k or ".lora_B." in k for k in p.tensors)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in p.tensors)
    # tiny Llama: 2 layers x 7 projections x (A, B) = 28 tensors
    assert len(p.tensors) == 2 * 7 * 2
    assert (p.rank, p.alpha, p.scaling) == (8, 32.0, 4.0)
    assert p.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    full = sum(t.numel() * t.element_size() for t in adapters.merged_state().values())
    assert p.nbytes == sum(t.numel() * 4 for t in p.tensors.values()) and p.nbytes * 10 < full
    # The probe: fixed ids, and at B = 0 the adapted policy's log-probs are the base model's.
    assert p.probe_ids == probe_token_ids(adapters.lm.config.vocab_size) and len(p.probe_ids) == 16
    assert p.probe_logprobs.shape == (15,) and p.probe_logprobs.dtype == torch.float32
    with adapters.disabled():
        base = _base_logprobs(adapters.lm, p.probe_ids)
    assert torch.equal(p.probe_logprobs, base)
    _train_b(adapters, 1)
    moved = adapters.payload()
    assert (moved.probe_logprobs - base).abs().max() > 1e-2
    assert moved.checksum() != p.checksum()


def test_peft_folder_round_trip_loads_in_peft_and_checksums_cover_the_scaling(adapters, tiny_policy_path, tmp_path):
    from peft import PeftModel

    _train_b(adapters, 2)
    p = adapters.payload()
    d = write_peft_dir(p, tmp_path / "v1")
    tensors, config = read_peft_dir(d)
    assert adapter_checksum(tensors, config) == p.checksum()
    # peft itself loads the folder and computes the probe's log-probs the learner sent
    fresh = PeftModel.from_pretrained(load_causal_lm(str(tiny_policy_path), "cpu"), str(d)).eval()
    assert (_base_logprobs(fresh, p.probe_ids) - p.probe_logprobs).abs().max() < 1e-6
    # another alpha (scaling) or another tensor: another checksum
    assert adapter_checksum(tensors, {**config, "lora_alpha": 16.0}) != p.checksum()
    other = dict(tensors)
    key = next(k for k in other if ".lora_B." in k)
    other[key] = other[key] + 1e-3
    assert adapter_checksum(other, config) != p.checksum()


class FolderEngine:
    """A stand-in engine: writes each adapter like VllmEngine and answers the probe with what it is told."""

    def __init__(self, root):
        self.root, self.path, self.answer = root, None, None

    def load_adapter(self, payload, version):
        self.path = write_peft_dir(payload, self.root / f"v{version}")

    def adapter_read_back(self):
        return read_peft_dir(self.path)

    def probe_logprobs(self, ids):
        return self.answer


def _verify(receiver: WeightReceiver, version: int, learner_checksum: str) -> None:
    compare_checksums(version, learner_checksum, [receiver.status()], [receiver.engine_checksum()])


def test_receiver_verifies_an_adapter_and_catches_stale_and_wrongly_scaled_ones(adapters, tmp_path):
    engine = FolderEngine(tmp_path)
    rx = WeightReceiver(engine, "g0", expected_names={"model.embed_tokens.weight"})  # not used for adapters
    p0 = adapters.payload()
    report = rx.load(0, p0)
    assert (report.payload, report.bytes) == ("adapter", p0.nbytes)
    engine.answer = p0.probe_logprobs + 1e-6  # within the fp32 tolerance
    _verify(rx, 0, p0.checksum())
    assert rx.engine_checksum().probe_max_diff == pytest.approx(1e-6, rel=0.2)

    _train_b(adapters, 3)
    p1 = adapters.payload()
    rx.load(1, p1)
    engine.answer = p0.probe_logprobs + 1e-6  # the engine still serves version 0 (a reused adapter id)
    with pytest.raises(WeightSyncError, match="adapter changed at version 1 but the engine's output did not"):
        _verify(rx, 1, p1.checksum())

    rx2 = WeightReceiver(FolderEngine(tmp_path / "b"), "g1", None)
    rx2.load(1, p1)
    rx2.engine.answer = p0.probe_logprobs + 2 * (p1.probe_logprobs - p0.probe_logprobs)  # scaling doubled
    with pytest.raises(WeightSyncError, match=r"differ from the learner.s by .* \(wrong adapter or scaling\)"):
        _verify(rx2, 1, p1.checksum())

    rx2.engine.answer = p1.probe_logprobs.clone()
    _verify(rx2, 1, p1.checksum())
    # a folder written with another alpha: the read-back no longer matches what was received
    rx2.engine.load_adapter = lambda payload, version: setattr(
        rx2.engine, "path", write_peft_dir(payload, tmp_path / "c", config={**payload.peft_config(), "lora_alpha": 1.0}))
    rx2.load(2, p1)
    with pytest.raises(WeightSyncError, match="engine computes with 1 tensor.*config.*the engine load failed"):
        _verify(rx2, 2, p1.checksum())


def test_probe_check_by_hand():
    learner0, learner1 = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    c = probe_check(learner1 + 5e-5, learner1, None, None)  # no previous version: only the difference
    assert c.max_diff == pytest.approx(5e-5, rel=1e-2)  # fp32 rounding of -1.5 + 5e-5 and not c.unchanged
    c = probe_check(learner1, learner1, learner0, learner0)  # learner moved 0.5, engine moved too
    assert (c.max_diff, c.unchanged) == (0.0, False)
    c = probe_check(learner0, learner1, learner0, learner0)  # learner moved 0.5, engine did not
    assert c.unchanged and c.max_diff == 0.5
    c = probe_check(learner0, learner0 + LOGPROB_ATOL / 2, learner0, learner0)  # learner barely moved: not "unchanged"
    assert not c.unchanged


@pytest.mark.parametrize("rank,engine", [(1, 1), (4, 8), (8, 8), (12, 16), (64, 64), (300, 320)])
def test_engine_lora_rank_rounds_up_to_what_vllm_accepts(rank, engine):
    assert engine_lora_rank(rank) == engine


def test_vllm_lora_ranks_copy_matches_the_installed_vllm():
    """Read from vLLM's source (importing vllm costs seconds): ``MaxLoRARanks = Literal[1, 8, ...]``."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    source = (Path(spec.submodule_search_locations[0]) / "config" / "lora.py").read_text()
    found = re.search(r"^MaxLoRARanks = Literal\[([0-9, ]+)\]", source, re.M)
    assert found, "vllm/config/lora.py no longer defines MaxLoRARanks as a Literal of ints"
    assert tuple(int(r) for r in found.group(1).split(",")) == VLLM_LORA_RANKS


def test_config_adapter_sync_resolves_the_engine_rank_and_refuses_what_cannot_run():
    cfg = load_config("tiny", ["lora.rank=4", "lora.sync=adapter"])
    assert cfg.engine_max_lora_rank == 8 and cfg.lora.resolved_sync == "adapter"
    assert load_config("tiny", ["lora.rank=8"]).engine_max_lora_rank is None  # auto: merged
    assert load_config("tiny", ["lora.rank=8", "lora.sync=merged"]).engine_max_lora_rank is None
    assert load_config("tiny", ["lora.sync=adapter"]).engine_max_lora_rank is None  # rank 0: no LoRA
    assert load_config("tiny", ["lora.rank=8", "lora.sync=adapter",
                                "generators.max_lora_rank=32"]).engine_max_lora_rank == 32
    with pytest.raises(UserError, match=r"lora.rank=16 is larger than the engines' max_lora_rank=8 .*"
                                         r"set generators.max_lora_rank to 16 or more"):
        load_config("tiny", ["lora.rank=16", "lora.sync=adapter", "generators.max_lora_rank=8"])
    with pytest.raises(UserError, match="generators.max_lora_rank=12 is not one vLLM accepts"):
        load_config("tiny", ["lora.rank=8", "lora.sync=adapter", "generators.max_lora_rank=12"])
    with pytest.raises(UserError, match="lora.rank=600 is larger than the engines' max_lora_rank=512"):
        load_config("tiny", ["lora.rank=600", "lora.sync=adapter"])
    with pytest.raises(UserError, match="set sync.backend=object_store"):
        load_config("tiny", ["lora.rank=8", "lora.sync=adapter", "sync.backend=collective"])


def test_payload_is_plain_data_that_pickles(adapters):
    import pickle

    p = adapters.payload()
    q = pickle.loads(pickle.dumps(p))
    assert isinstance(q, AdapterPayload) and q.checksum() == p.checksum()
    assert torch.equal(q.probe_logprobs, p.probe_logprobs)


def test_adapter_sync_is_refused_where_vllm_serves_no_lora_for_the_architecture(tmp_path):
    from ray_rlhf.preflight import check_adapter_sync, vllm_serves_lora

    if vllm_serves_lora("LlamaForCausalLM") is None:
        pytest.skip("vLLM's source is not installed here")
    # read from vLLM 0.32's source: GPT-2's class has no SupportsLoRA; Phi-3's inherits Llama's
    assert [vllm_serves_lora(a) for a in ("LlamaForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
                                          "GPT2LMHeadModel", "NoSuchArch")] == [True, True, True, False, None]
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    adapter = load_config("tiny", ["lora.rank=8", "lora.sync=adapter"])
    with pytest.raises(UserError, match="lora.sync=adapter: vLLM cannot serve LoRA adapters for GPT2LMHeadModel .* "
                                        "set lora.sync=merged"):
        check_adapter_sync(adapter, gpt2)
    check_adapter_sync(load_config("tiny", ["lora.rank=8"]), gpt2)  # merged: any architecture
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    check_adapter_sync(adapter, llama)
