"""clusters/colocated/: the one-node, 8-GPU colocated example, checked offline like the split ones
(tests/unit/test_clusters.py): Ray's launcher schema and ``validate_config``, the instance's GPUs,
the image's Ray version, and the run command in its header -- it loads, passes the pairing check and
pairs one generator and one learner rank per GPU of the node."""

from __future__ import annotations

import copy
import re

import jsonschema
import ray
import yaml

from ray_rlhf.preflight import check_placement
from tests.unit.test_clusters import CLUSTERS, KNOWN_GPUS, check_train_command, image_ray_version, ray_minor, ray_schema

EXAMPLE = CLUSTERS / "colocated" / "aws-8gpu.yaml"


def header_command() -> str:
    """The ``python -m ray_rlhf.train`` command of the file's header comment, lines joined."""
    lines = [line.lstrip("# ").rstrip() for line in EXAMPLE.read_text().splitlines() if line.startswith("#")]
    text = re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))
    (line,) = [m for m in text.splitlines() if "python -m ray_rlhf.train" in m]
    return line[line.index("python -m ray_rlhf.train"):].strip()


def test_example_is_a_valid_one_node_launcher_config():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = yaml.safe_load(EXAMPLE.read_text())
    jsonschema.validate(cfg, ray_schema())
    validate_config(copy.deepcopy(cfg))
    validate_config(fillout_defaults(copy.deepcopy(cfg)))
    (name,) = cfg["available_node_types"]
    node = cfg["available_node_types"][name]
    assert cfg["head_node_type"] == name and cfg["max_workers"] == 0 and node["max_workers"] == 0
    assert node["resources"]["GPU"] == KNOWN_GPUS[node["node_config"]["InstanceType"]] == 8
    assert ray_minor(image_ray_version(cfg["docker"]["image"])) == ray_minor(ray.__version__)


def test_header_command_pairs_one_generator_and_one_rank_per_gpu():
    cfg = check_train_command(header_command())
    check_placement(cfg)
    g, lc = cfg.generators, cfg.learner
    assert cfg.placement == "colocated" and g.num == lc.num == 8
    assert g.num_gpus + lc.num_gpus == 1 and lc.device == "cuda"
    assert cfg.ray.gpu_memory_gib == 40  # p4d.24xlarge: A100 40 GB
