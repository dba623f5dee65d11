"""Weight sync between a stand-in learner actor and two Generator actors on a real local Ray.

Both backends: the object store and a gloo collective; the collective group is rebuilt after a
generator is removed. After every sync the engines' read-back checksums must equal the learner's.
"""

from __future__ import annotations

import pytest
import torch

from ray_rlhf.generator import Generator, core_list_for
from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec
from ray_rlhf.sync.checksum import state_dict_checksum
from ray_rlhf.sync.collective import CollectiveSourceMixin, broadcast_collective, close_group, open_group
from ray_rlhf.sync.object_store import broadcast_object_store

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")


class StandInLearner(CollectiveSourceMixin):
    """The learner's weight-sync surface only: an HF Llama whose weights we perturb."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def perturb(self, seed: int, scale: float = 0.02) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def weights_checksum(self) -> str:
        return state_dict_checksum(self.hf_state_dict())


@pytest.fixture(scope="module")
def cluster(tiny_policy_path):

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    learner = ray.remote(num_cpus=0.5)(StandInLearner).remote(str(tiny_policy_path))
    gen_cls = ray.remote(num_cpus=0.5)(Generator)
    # Each engine pinned to its own core (round-robin over this machine's cores).
    gens = [
        gen_cls.remote(str(tiny_policy_path), f"g{i}", max_model_len=64, max_prompt_tokens=16, omp_threads_bind=core_list_for(i))
        for i in range(2)
    ]
    ray.get([g.ping.remote() for g in gens] + [learner.weights_checksum.remote()])
    yield learner, gens
    for g in gens:
        try:
            ray.get(g.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the removed generator is already dead
            pass
    ray.shutdown()


def _same_rollouts_everywhere(gens, version):
    """Seeded generation on every generator: same weights -> same tokens, tagged ``version``."""
    spec = SamplingSpec(n=2, max_new_tokens=6, seed=1)
    shard = PromptShard(0, (PromptItem(0, "The cat"), PromptItem(1, "Water is")))
    outs = ray.get([g.generate.remote(shard, spec) for g in gens])
    assert all(r.policy_version == version for out in outs for r in out)
    assert len({tuple(tuple(r.response_ids) for r in out) for out in outs}) == 1
    return outs[0]


def test_object_store_sync_verifies_on_every_generator(cluster):
    learner, gens = cluster
    before = _same_rollouts_everywhere(gens, 0)
    ray.get(learner.perturb.remote(1))
    res = broadcast_object_store(learner, gens, version=1)  # verify on: raises on any mismatch
    print(f"\nobject_store: {res}")
    assert res.version == 1 and res.num_generators == 2
    assert res.checksum == ray.get(learner.weights_checksum.remote())
    assert res.bytes == sum(t.numel() * 4 for t in ray.get(learner.hf_state_dict.remote()).values())
    infos = ray.get([g.info.remote() for g in gens])
    assert [i["version"] for i in infos] == [1, 1]
    assert [i["cpu_affinity"] for i in infos] == [[int(core_list_for(k))] for k in range(2)]
    after = _same_rollouts_everywhere(gens, 1)
    assert [r.response_ids for r in after] != [r.response_ids for r in before]


def test_collective_sync_and_rebuild_after_a_generator_leaves(cluster):
    learner, gens = cluster
    info = open_group(learner, gens, backend="gloo", timeout_s=120)
    assert info.world_size == 3
    for version in (2, 3):
        ray.get(learner.perturb.remote(version))
        res = broadcast_collective(learner, gens, version)  # verify on
        print(f"\ncollective: {res}")
        assert res.checksum == ray.get(learner.weights_checksum.remote()) and res.num_generators == 2
    _same_rollouts_everywhere(gens, 3)

    # The pool shrinks: g1 dies; the group is torn down and rebuilt for the survivors.
    ray.kill(gens[1])
    close_group(learner, gens)
    info2 = open_group(learner, gens[:1], backend="gloo", timeout_s=120)
    assert info2.world_size == 2 and info2.group_name != info.group_name
    ray.get(learner.perturb.remote(4))
    res = broadcast_collective(learner, gens[:1], 4)
    print(f"\ncollective after rebuild: {res}")
    assert ray.get(gens[0].get_version.remote()) == 4
    close_group(learner, gens[:1])
