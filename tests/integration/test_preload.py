"""``generators.preload``: an actor built with the run's preload options starts with the libraries
mapped into its process (real Ray; the generator actor class gets the same options)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from ray_rlhf.config import load_config
from ray_rlhf.run.actors import generator_actor, preload_options

pytestmark = pytest.mark.integration

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


class Probe:
    def mapped(self) -> tuple[str, bool]:
        import os

        return os.environ.get("LD_PRELOAD", ""), TCMALLOC.name in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not TCMALLOC.is_file(), reason="libtcmalloc-minimal4 is not installed here")
def test_preloaded_library_is_mapped_in_the_actor_process():
    cfg = load_config("tiny", [f"generators.preload=[{TCMALLOC}]"])
    assert generator_actor(cfg)._default_options["runtime_env"] == preload_options(cfg.generators.preload)["runtime_env"]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with_lib = ray.remote(num_cpus=0, **preload_options(cfg.generators.preload))(Probe).remote()
        without = ray.remote(num_cpus=0)(Probe).remote()
        (env, mapped), (_, mapped_without) = ray.get([with_lib.mapped.remote(), without.mapped.remote()])
    finally:
        ray.shutdown()
    assert env.split(":")[0] == str(TCMALLOC) and mapped
    assert not mapped_without
