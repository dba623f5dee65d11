"""The WeightBroadcaster between a real Learner actor and two Generator actors on a real local Ray.

Both backends: the object store and a gloo collective. The collective group is rebuilt when a
generator dies, and the broadcaster reports the lost one and syncs the survivor. After every sync
the engines' read-back checksums must equal the learner's.
"""

from __future__ import annotations

import pytest
import torch

from ray_rlhf.config.schema import KLConfig, PPOConfig
from ray_rlhf.generation.generator import Generator, core_list_for
from ray_rlhf.learning.learner import Learner
from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec
from ray_rlhf.sync.broadcaster import WeightBroadcaster
from ray_rlhf.sync.receiver import WeightReceiver
from ray_rlhf.sync.remote import call
from tests.batches import sequences

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")


def perturb(learner, seed: int, scale: float = 0.02) -> None:
    """Change the learner's policy weights in place (as an update would), on its actor."""
    def change(self):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.lm.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)

    ray.get(learner.__ray_call__.remote(change))


@pytest.fixture(scope="module")
def cluster(tiny_policy_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    learner = ray.remote(num_cpus=0.5)(Learner).remote(str(tiny_policy_path), PPOConfig(), KLConfig())
    gen_cls = ray.remote(num_cpus=0.5)(Generator)
    # Each engine pinned to its own core (round-robin over this machine's cores).
    gens = {f"g{i}": gen_cls.remote(str(tiny_policy_path), f"g{i}", max_model_len=64, omp_threads_bind=core_list_for(i))
            for i in range(2)}
    ray.get([g.ping.remote() for g in gens.values()] + [learner.ping.remote()])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    yield learner, gens, tok
    for g in gens.values():
        try:
            ray.get(g.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the killed generator is already dead
            pass
    ray.shutdown()


def _same_rollouts_everywhere(gens, tok, version):
    """Seeded generation on every generator: same weights -> same tokens, tagged ``version``."""
    spec = SamplingSpec(n=2, max_new_tokens=6, seed=1)
    shard = PromptShard(0, tuple(PromptItem(i, t, tuple(tok(t).input_ids)) for i, t in enumerate(["The cat", "Water is"])))
    outs = [sequences(ray.get(g.generate.options(num_returns=2).remote(shard, spec)[1])) for g in gens.values()]
    assert all(r.policy_version == version for out in outs for r in out)
    assert len({tuple(tuple(r.response_ids) for r in out) for out in outs}) == 1
    return outs[0]


def test_object_store_publish_verifies_every_engine(cluster):
    learner, gens, tok = cluster
    broadcaster = WeightBroadcaster(learner, "object_store", verify=True)
    broadcaster.join(gens)  # version 0: verify only, the engines hold the initial weights
    before = _same_rollouts_everywhere(gens, tok, 0)
    perturb(learner, 1)
    res = broadcaster.publish(1, gens)  # verify on: raises on any mismatch
    print(f"\nobject_store: {res}")
    assert res.version == broadcaster.version == 1 and res.num_generators == 2 and res.lost == ()
    assert res.checksum == ray.get(learner.weights_checksum.remote())
    assert res.bytes == sum(t.numel() * 4 for t in ray.get(learner.hf_state_dict.remote()).values())
    infos = ray.get([g.info.remote() for g in gens.values()])
    assert [i["version"] for i in infos] == [1, 1]
    assert [i["cpu_affinity"] for i in infos] == [[int(core_list_for(k))] for k in range(2)]
    after = _same_rollouts_everywhere(gens, tok, 1)
    assert [r.response_ids for r in after] != [r.response_ids for r in before]


def test_collective_publish_and_rebuild_after_a_generator_dies(cluster):
    learner, gens, tok = cluster
    broadcaster = WeightBroadcaster(learner, "collective", verify=True)
    broadcaster.version = 1  # continues from the previous test's object-store sync
    for version in (2, 3):
        perturb(learner, version)
        res = broadcaster.publish(version, gens)  # the first publish opens the group
        print(f"\ncollective: {res}")
        assert res.checksum == ray.get(learner.weights_checksum.remote()) and res.num_generators == 2
    group = broadcaster.backend._group
    assert group == ("g0", "g1")
    _same_rollouts_everywhere(gens, tok, 3)

    # g1 dies: the broadcaster leaves it out, rebuilds the group for the survivor and reports it.
    ray.kill(gens["g1"])
    perturb(learner, 4)
    res = broadcaster.publish(4, gens)
    print(f"\ncollective after a death: {res}")
    assert res.lost == ("g1",) and res.num_generators == 1 and broadcaster.backend._group == ("g0",)
    assert ray.get(call(gens["g0"], WeightReceiver.status)).version == 4
    broadcaster.close({"g0": gens["g0"]})
