"""``placement=colocated`` without Ray: the engine's phase order on CPU (no sleep mode there), the
preflight refusals, the memory budget from a model's files, the driver-side phase owner, and the
learner's offload/reload (a no-op move on CPU that must not change the update)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ray_rlhf.budget import GIB
from ray_rlhf.config import load_config
from ray_rlhf.errors import UserError
from ray_rlhf.generation.vllm_engine import EngineAsleepError, EngineSleep, sleep_mode_available
from ray_rlhf.preflight import check_memory_budget, check_placement, colocated_budget, model_size
from ray_rlhf.run.placement import Colocation, colocated_bundles

PAIRED = ["placement=colocated", "generators.num=2", "learner.num=2", "generators.num_gpus=0.5",
          "learner.num_gpus=0.5", "ray.num_gpus=2"]


class FakeLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up",))


def test_vllm_cpu_build_has_no_sleep_mode():
    """The capability check: vLLM's CPU build refuses enable_sleep_mode, so the engine must not ask."""
    pytest.importorskip("vllm")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    assert sleep_mode_available() is False


def test_cpu_engine_enforces_and_records_the_phase_order_without_sleeping():
    llm = FakeLLM()
    phases = EngineSleep(llm, real=False, name="gen-0")
    phases.check_awake("generate")
    phases.record("generate")
    assert phases.sleep() is False  # nothing released on CPU
    with pytest.raises(EngineAsleepError, match="gen-0: generate while the engine sleeps"):
        phases.check_awake("generate")
    with pytest.raises(EngineAsleepError, match="already asleep"):
        phases.sleep()
    assert phases.wake_up() is False
    with pytest.raises(EngineAsleepError, match="while awake"):
        phases.wake_up()
    assert phases.take_events() == ["generate", "sleep", "wake_up"] and phases.events == []
    assert llm.calls == []  # the CPU engine was never asked to sleep


def test_gpu_engine_sleeps_at_level_one_and_wakes():
    llm = FakeLLM()
    phases = EngineSleep(llm, real=True)
    assert phases.sleep() is True and phases.wake_up() is True
    assert llm.calls == [("sleep", 1), ("wake_up",)]


@pytest.mark.parametrize("overrides, expect", [
    (["generators.num=3"], ["generators.num=3", "learner.num=2", "cannot pair up"]),
    (["generators.max=4"], ["generators.min/max", "2/4"]),
    (["generators.tensor_parallel_size=2", "sync.verify=false"], ["tensor_parallel_size=2"]),
    (["learner.num_gpus=0"], ["generators.num_gpus=0.5", "learner.num_gpus=0"]),
    (["learner.num_gpus=1"], ["1.5 > 1"]),
    (["rollout.max_staleness=1"], ["rollout.max_staleness=1"]),
    (["sync.backend=collective"], ["sync.backend=collective", "NCCL", "sync.backend=object_store"]),
])
def test_pairs_that_cannot_share_the_gpus_are_refused_in_one_line(overrides, expect):
    cfg = load_config("tiny", [*PAIRED, *overrides])
    with pytest.raises(UserError) as e:
        check_placement(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "placement=split" in msg
    for part in expect:
        assert part in msg, part


def test_paired_and_split_configs_pass_and_bundles_add_the_shares():
    cfg = load_config("tiny", [*PAIRED, "generators.num_cpus=0.25", "learner.num_cpus=0.5"])
    check_placement(cfg)
    check_placement(load_config("tiny", ["generators.num=3"]))  # split: anything goes
    assert colocated_bundles(cfg) == [{"CPU": 0.75, "GPU": 1.0}] * 2
    assert colocated_bundles(load_config("tiny", ["placement=colocated", "learner.num=2"])) == [{"CPU": 1.0}] * 2


def test_budget_from_the_model_files(tiny_policy_path):
    params, text = model_size(tiny_policy_path)
    state = json.loads((tiny_policy_path / "config.json").read_text())
    assert text["hidden_size"] == state["hidden_size"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_path)
    assert params == sum(t.numel() for t in model.state_dict().values() if t.dtype.is_floating_point)
    cfg = load_config("tiny", [*PAIRED, "ray.gpu_memory_gib=8"])
    b = colocated_budget(cfg, tiny_policy_path, 8 * GIB)
    assert b.engine_weights == 4 * params and b.learner.optimizer == 8 * params and b.engine_share == 4 * GIB
    check_memory_budget(cfg, tiny_policy_path)  # fits 8 GiB
    with pytest.raises(UserError, match=r"placement=colocated does not fit: per GPU of 2\.00 GiB: training"):
        check_memory_budget(load_config("tiny", [*PAIRED, "ray.gpu_memory_gib=2"]), tiny_policy_path)
    check_memory_budget(load_config("tiny", [*PAIRED[:3], "ray.gpu_memory_gib=2"]), tiny_policy_path)  # CPU: no GPU share
    check_memory_budget(load_config("tiny", [*PAIRED]), tiny_policy_path)  # memory unknown here: skipped


class FakePool:
    def __init__(self, log):
        self.log = log

    def sleep(self):
        self.log.append("engines sleep")
        return {"gen-0": {"released": False, "events": ["generate", "sleep"]}}

    def wake_up(self):
        self.log.append("engines wake")
        return {"gen-0": {"released": False, "events": ["wake_up"]}}


class FakeLearners:
    def __init__(self, log):
        self.log = log

    def offload(self):
        self.log.append("learner offload")
        return 8

    def reload(self):
        self.log.append("learner reload")
        return 8


def test_colocation_orders_the_phases_and_records_them(tmp_path):
    log: list[str] = []
    pool, learners, c = FakePool(log), FakeLearners(log), Colocation(tmp_path)
    c.generating(1, pool, learners)  # first: the engines are awake already
    c.generating(1, pool, learners)  # no-op
    c.training(1, pool, learners)
    c.training(1, pool, learners)  # no-op
    c.generating(1, pool, learners)
    assert log == ["learner offload", "engines sleep", "learner reload", "learner offload", "engines wake"]
    rows = [json.loads(line) for line in (tmp_path / "phases.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["generation", "training", "generation"]
    assert rows[1]["engines"] == {"gen-0": ["generate", "sleep"]} and rows[1]["learner_bytes_moved"] == 8


class Square(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = nn.Linear(3, 2)
        self.critic = None


def _engine():
    from ray_rlhf.learning.engine import Engine, EngineOptions, Optimization

    torch.manual_seed(0)
    optim = Optimization(epochs=1, minibatch_size=1, micro_batch_size=1, micro_batch_tokens=None, lr=0.1,
                         max_grad_norm=1e9)
    return Engine(Square(), None, EngineOptions(), optim, seed=0)


def _adam_step(eng):
    eng.optimizer.zero_grad(set_to_none=True)
    (eng.model.lm.weight.square().sum() + eng.model.lm.bias.sum()).backward()
    eng.optimizer.step()


def test_offload_and_reload_leave_the_update_unchanged_on_cpu():
    """Between two AdamW steps, offload (gradients freed, moments 'moved' to CPU: 2 x (6 + 2) floats
    = 64 bytes) and reload: the weights after the second step equal those of an engine that did not."""
    plain, moved = _engine(), _engine()
    assert moved.offload() == 0  # no AdamW state before the first step
    for eng in (plain, moved):
        _adam_step(eng)
    assert moved.offload() == 2 * (6 + 2) * 4
    assert all(p.grad is None for p in moved.model.parameters())
    assert moved.reload() == 64
    assert moved.optimizer.state[moved.model.lm.weight]["step"].device.type == "cpu"
    for eng in (plain, moved):
        _adam_step(eng)
    torch.testing.assert_close(moved.model.lm.weight, plain.model.lm.weight, rtol=0, atol=0)


def test_logical_gpus_of_a_local_ray_count_as_gpus(monkeypatch):
    """``ray.num_gpus`` declares the local Ray's GPUs (logical on a CPU machine): two pairs of 0.5 + 0.5
    need 2 of them."""
    from ray_rlhf.preflight import check_local_capacity

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_local_capacity(load_config("tiny", [*PAIRED, "ray.num_cpus=4"]))
    with pytest.raises(UserError, match=r"need 2 GPUs but this local Ray has 1; .*ray.num_gpus"):
        check_local_capacity(load_config("tiny", [*PAIRED[:-1], "ray.num_gpus=1", "ray.num_cpus=4"]))
