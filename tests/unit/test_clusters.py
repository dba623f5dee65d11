"""Offline checks of everything in clusters/ (no cloud, no Kubernetes, no Ray cluster started).

- Cluster-launcher YAMLs (clusters/*.yaml but runtime_env.yaml) against the schema that Ray ships
  (ray/autoscaler/ray-schema.json) and Ray's own validate_config, plus the project's layout:
  CPU head, elastic GPU `generator` type, single GPU `learner` type, the project installed from
  the synced repo with the `gpu` extra.
- clusters/runtime_env.yaml: only runtime_env fields Ray knows (RuntimeEnv(**d) does NOT reject
  unknown fields, it only type-checks known ones -- see test_runtime_env_constructor_accepts_unknown).
- KubeRay manifests: every key against an allow-list tree (KubeRay's CRD accepts and silently
  drops unknown fields), the autoscaling groups, the entrypoint.
- Every `python -m ray_rlhf.train ...` command in the manifests and clusters/README.md parses
  with the real CLI parser and config loader, so docs and manifests cannot drift from the config.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
KUBERAY = CLUSTERS / "kuberay"
RUNTIME_ENV = CLUSTERS / "runtime_env.yaml"
LAUNCHER_FILES = sorted(p for p in CLUSTERS.glob("*.yaml") if p.name != RUNTIME_ENV.name)
KUBERAY_FILES = sorted(KUBERAY.glob("*.yaml"))

# GPUs of the instance/machine types used, to check each node type's declared GPU count.
KNOWN_GPUS = {
    "m5.2xlarge": 0, "g5.2xlarge": 1, "g5.12xlarge": 4, "p4d.24xlarge": 8,
    "n2-standard-8": 0, "g2-standard-8": 1, "g2-standard-48": 4,
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def ray_schema() -> dict:
    path = Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def ray_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def image_ray_version(image: str) -> str:
    """`rayproject/ray:2.60.0-py311-gpu` -> `2.60.0`."""
    m = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py3\d+(?:-\w+)?", image)
    assert m, f"not a versioned rayproject image: {image}"
    return m.group(1)


# --------------------------------------------------------------------------- cluster launcher


def test_launcher_files_present():
    assert {p.name for p in LAUNCHER_FILES} >= {"aws.yaml", "gcp.yaml"}


@pytest.fixture(params=LAUNCHER_FILES, ids=lambda p: p.name)
def launcher(request) -> tuple[Path, dict]:
    return request.param, load(request.param)


def test_launcher_validates_against_ray_schema(launcher):
    path, cfg = launcher
    schema = ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cfg)]
    assert not errors, f"{path.name} fails ray-schema.json:\n" + "\n".join(errors)


def test_launcher_passes_ray_validate_config(launcher):
    """What `ray up` runs: schema + head type + sum(min_workers) <= max_workers, before and after
    merging Ray's provider defaults."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    _, cfg = launcher
    validate_config(copy.deepcopy(cfg))
    validate_config(fillout_defaults(copy.deepcopy(cfg)))


def test_schema_check_catches_misspelled_key(launcher):
    _, cfg = launcher
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["generator"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(bad, ray_schema())


def test_launcher_node_types(launcher):
    path, cfg = launcher
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert {"generator", "learner"} <= set(types)

    gen, learner = types["generator"], types["learner"]
    assert gen["resources"]["GPU"] >= 1 and gen["resources"].get("generator_slot") == 1
    assert gen["min_workers"] in (0, 1)
    assert gen["max_workers"] >= 2, "the generator pool must be able to grow"
    assert learner["resources"]["GPU"] >= 1 and learner["resources"].get("learner_slot") == 1
    assert learner["min_workers"] == learner["max_workers"] == 1
    assert learner["resources"]["GPU"] >= gen["resources"]["GPU"], "the learner node is the bigger one"
    assert cfg["max_workers"] >= gen["max_workers"] + learner["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30

    for name, nt in types.items():
        ncfg = nt["node_config"]
        itype = ncfg.get("InstanceType") or ncfg.get("machineType")
        assert itype in KNOWN_GPUS, f"{path.name}:{name}: unknown instance type {itype}"
        assert nt["resources"].get("GPU", 0) == KNOWN_GPUS[itype], f"{path.name}:{name}: GPU count != {itype}"


def test_launcher_installs_project(launcher):
    path, cfg = launcher
    assert cfg["file_mounts"].get("~/ray-rlhf") == ".", "the repo is synced to ~/ray-rlhf"
    commands = cfg["setup_commands"] + cfg.get("worker_setup_commands", [])
    installs = [c for c in commands if "pip install" in c and "-e '.[gpu]'" in c and "cd ~/ray-rlhf" in c]
    assert installs, f"{path.name}: no setup command runs `cd ~/ray-rlhf && pip install -e '.[gpu]'`"
    excluded = set(cfg["rsync_exclude"])
    assert {".venv", "runs", "benchmarks/results"} <= excluded

    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_launcher_image_matches_local_ray(launcher):
    """`ray up` and `ray job submit` want the laptop's Ray to match the cluster's."""
    _, cfg = launcher
    version = image_ray_version(cfg["docker"]["image"])
    assert ray_minor(version) == ray_minor(ray.__version__)


def test_aws_specifics():
    cfg = load(CLUSTERS / "aws.yaml")
    types = cfg["available_node_types"]
    amis = {nt["node_config"]["ImageId"] for nt in types.values()}
    assert len(amis) == 1, "one AMI for all node types"
    assert types["generator"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["learner"]["node_config"], "the learner is on-demand"


def test_gcp_accelerators_match_zone_project_and_gpus():
    cfg = load(CLUSTERS / "gcp.yaml")
    prov = cfg["provider"]
    for name in ("generator", "learner"):
        nt = cfg["available_node_types"][name]
        (acc,) = nt["node_config"]["guestAccelerators"]
        assert acc["acceleratorType"].startswith(
            f"projects/{prov['project_id']}/zones/{prov['availability_zone']}/acceleratorTypes/"
        )
        assert acc["acceleratorCount"] == nt["resources"]["GPU"]
        assert nt["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


# --------------------------------------------------------------------------- runtime_env

RUNTIME_ENV_FIELDS = {f for f in RuntimeEnv.known_fields if not f.startswith("_")}


def runtime_env_problems(env: dict) -> list[str]:
    """Unknown fields (RuntimeEnv itself accepts them silently), then RuntimeEnv's type checks."""
    unknown = sorted(set(env) - RUNTIME_ENV_FIELDS)
    if unknown:
        return [f"unknown runtime_env field(s): {unknown}"]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        return [str(e)]
    return []


def test_runtime_env_is_valid():
    env = load(RUNTIME_ENV)
    assert runtime_env_problems(env) == []
    assert "working_dir" not in env, "--working-dir on the command line supplies it"
    assert env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert {".venv/", "runs/", "benchmarks/results/", ".git/"} <= set(env["excludes"])


def test_runtime_env_constructor_accepts_unknown():
    """Why runtime_env_problems checks field names itself: Ray's constructor lets a typo through."""
    RuntimeEnv(env_var={"A": "1"})  # no exception
    assert runtime_env_problems({"env_var": {"A": "1"}})
    assert runtime_env_problems({"env_vars": {"A": 1}}), "non-string env value is a TypeError"


# --------------------------------------------------------------------------- KubeRay strict keys
#
# Tree: dict = object with exactly these keys allowed; ANY = map with free keys (labels,
# rayStartParams); LEAF = scalar or list of scalars; [tree] = list of objects of that tree.

ANY = "any-keys"
LEAF = None

METADATA = {"name": LEAF, "namespace": LEAF, "labels": ANY, "annotations": ANY}
QUANTITIES = {"cpu": LEAF, "memory": LEAF, "nvidia.com/gpu": LEAF, "ephemeral-storage": LEAF}
RESOURCE_REQS = {"requests": QUANTITIES, "limits": QUANTITIES}
CONTAINER = {
    "name": LEAF, "image": LEAF, "imagePullPolicy": LEAF, "command": LEAF, "args": LEAF,
    "env": [{"name": LEAF, "value": LEAF}],
    "ports": [{"containerPort": LEAF, "name": LEAF, "protocol": LEAF}],
    "resources": RESOURCE_REQS,
    "volumeMounts": [{"name": LEAF, "mountPath": LEAF, "readOnly": LEAF, "subPath": LEAF}],
    "lifecycle": {"preStop": {"exec": {"command": LEAF}}},
}
POD_TEMPLATE = {
    "metadata": METADATA,
    "spec": {
        "containers": [CONTAINER],
        "volumes": [{
            "name": LEAF,
            "emptyDir": {"medium": LEAF, "sizeLimit": LEAF},
            "persistentVolumeClaim": {"claimName": LEAF, "readOnly": LEAF},
        }],
        "tolerations": [{"key": LEAF, "operator": LEAF, "value": LEAF, "effect": LEAF}],
        "nodeSelector": ANY,
        "serviceAccountName": LEAF,
    },
}
RAY_CLUSTER_SPEC = {
    "rayVersion": LEAF,
    "enableInTreeAutoscaling": LEAF,
    "autoscalerOptions": {
        "upscalingMode": LEAF, "idleTimeoutSeconds": LEAF, "resources": RESOURCE_REQS,
        "image": LEAF, "imagePullPolicy": LEAF, "env": [{"name": LEAF, "value": LEAF}],
    },
    "headGroupSpec": {"rayStartParams": ANY, "template": POD_TEMPLATE, "serviceType": LEAF},
    "workerGroupSpecs": [{
        "groupName": LEAF, "replicas": LEAF, "minReplicas": LEAF, "maxReplicas": LEAF,
        "idleTimeoutSeconds": LEAF, "rayStartParams": ANY, "template": POD_TEMPLATE,
    }],
}
TOP = {"apiVersion": LEAF, "kind": LEAF, "metadata": METADATA}
TREES = {
    "RayJob": {**TOP, "spec": {
        "entrypoint": LEAF, "runtimeEnvYAML": LEAF, "shutdownAfterJobFinishes": LEAF,
        "ttlSecondsAfterFinished": LEAF, "activeDeadlineSeconds": LEAF, "backoffLimit": LEAF,
        "submissionMode": LEAF, "jobId": LEAF, "entrypointNumCpus": LEAF, "entrypointNumGpus": LEAF,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
    }},
    "RayCluster": {**TOP, "spec": RAY_CLUSTER_SPEC},
    "PersistentVolumeClaim": {**TOP, "spec": {
        "accessModes": LEAF, "storageClassName": LEAF, "resources": {"requests": {"storage": LEAF}},
    }},
}
API_VERSIONS = {"RayJob": "ray.io/v1", "RayCluster": "ray.io/v1", "PersistentVolumeClaim": "v1"}


def key_problems(node: Any, tree: Any, path: str = "") -> list[str]:
    """Every key of `node` outside `tree`, and every shape mismatch, as `path: problem`."""
    where = path or "<root>"
    if tree is ANY:
        return [] if isinstance(node, dict) else [f"{where}: expected a mapping"]
    if tree is LEAF:
        if isinstance(node, dict) or (isinstance(node, list) and any(isinstance(x, (dict, list)) for x in node)):
            return [f"{where}: expected a value, got a structure"]
        return []
    if isinstance(tree, list):
        if not isinstance(node, list):
            return [f"{where}: expected a list"]
        return [p for i, item in enumerate(node) for p in key_problems(item, tree[0], f"{path}[{i}]")]
    if not isinstance(node, dict):
        return [f"{where}: expected a mapping"]
    out = []
    for key, value in node.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in tree:
            out.append(f"{sub}: unknown key (allowed: {', '.join(sorted(tree))})")
        else:
            out.extend(key_problems(value, tree[key], sub))
    return out


def manifest_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", d) for p in KUBERAY_FILES for i, d in enumerate(load_all(p))]


def rayjob() -> dict:
    (doc,) = load_all(KUBERAY / "rayjob.yaml")
    return doc


def test_kuberay_files_present():
    assert {"rayjob.yaml", "raycluster.yaml", "shared-pvc.yaml"} <= {p.name for p in KUBERAY_FILES}


@pytest.mark.parametrize("name,doc", manifest_docs(), ids=[n for n, _ in manifest_docs()])
def test_kuberay_keys_strict(name, doc):
    kind = doc.get("kind")
    assert kind in TREES, f"{name}: kind {kind!r} has no allow-list"
    assert doc["apiVersion"] == API_VERSIONS[kind]
    problems = key_problems(doc, TREES[kind])
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "path,old,new",
    [
        (("spec", "rayClusterSpec"), "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        (("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinished"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0), "maxReplicas", "maxReplica"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec"), "tolerations", "toleration"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
          "resources", "limits"), "nvidia.com/gpu", "nvidia.com/gpus"),
    ],
)
def test_kuberay_misspelled_key_is_caught(path, old, new):
    doc = copy.deepcopy(rayjob())
    node = doc
    for part in path:
        node = node[part]
    node[new] = node.pop(old)
    problems = key_problems(doc, TREES["RayJob"])
    assert len(problems) == 1 and new in problems[0] and "unknown key" in problems[0], problems


def test_kuberay_key_check_catches_structure_under_a_leaf():
    doc = copy.deepcopy(rayjob())
    doc["spec"]["entrypoint"] = {"python": "-m ray_rlhf.train"}
    assert key_problems(doc, TREES["RayJob"]) == ["spec.entrypoint: expected a value, got a structure"]


def groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def gpus(pod_template: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in pod_template["spec"]["containers"])


def test_rayjob_autoscaling_cluster():
    job = rayjob()
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert gpus(rc["headGroupSpec"]["template"]) == 0, "the head is a CPU pod"
    g = groups(rc)
    assert {"generator", "learner"} <= set(g)
    gen, learner = g["generator"], g["learner"]
    assert gen["minReplicas"] in (0, 1) and gen["maxReplicas"] >= 2
    assert gen["minReplicas"] <= gen.get("replicas", gen["minReplicas"]) <= gen["maxReplicas"]
    assert learner["minReplicas"] == learner["maxReplicas"] == learner["replicas"] == 1
    assert gpus(gen["template"]) >= 1 and gpus(learner["template"]) >= gpus(gen["template"])
    for tmpl in (gen["template"], learner["template"]):
        for c in tmpl["spec"]["containers"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]


def test_ray_start_params_are_strings_and_custom_resources_parse():
    for name, doc in manifest_docs():
        if doc["kind"] == "PersistentVolumeClaim":
            continue
        rc = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for grp in [rc["headGroupSpec"], *rc["workerGroupSpecs"]]:
            params = grp["rayStartParams"]
            assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values are strings"
            if "resources" in params:  # KubeRay wants the JSON quoted: '"{\"x\": 1}"'
                parsed = json.loads(json.loads(params["resources"]))
                assert parsed == {f"{grp['groupName']}_slot": 1}


def test_raycluster_matches_rayjob_cluster():
    (rc,) = load_all(KUBERAY / "raycluster.yaml")
    assert rc["spec"] == rayjob()["spec"]["rayClusterSpec"]


def test_rayjob_runtime_env_yaml_is_valid_and_matches_runtime_env():
    env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    assert runtime_env_problems(env) == []
    assert env["env_vars"] == load(RUNTIME_ENV)["env_vars"]


def test_images_and_ray_versions_agree():
    rc = rayjob()["spec"]["rayClusterSpec"]
    templates = [rc["headGroupSpec"]["template"], *(g["template"] for g in rc["workerGroupSpecs"])]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    assert len(images) == 1, f"one project image for every pod: {images}"
    base = re.search(r"^FROM (\S+)", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    versions = {rc["rayVersion"], image_ray_version(base)}
    versions |= {image_ray_version(load(p)["docker"]["image"]) for p in LAUNCHER_FILES}
    assert len(versions) == 1, f"Ray versions differ across clusters/: {versions}"
    assert ray_minor(versions.pop()) == ray_minor(ray.__version__)


def test_volumes_reference_the_shared_claim():
    (pvc,) = load_all(KUBERAY / "shared-pvc.yaml")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    rc = rayjob()["spec"]["rayClusterSpec"]
    for tmpl in [rc["headGroupSpec"]["template"], *(g["template"] for g in rc["workerGroupSpecs"])]:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in tmpl["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}


# --------------------------------------------------------------------------- train commands


def check_train_command(command: str):
    """The command runs `python -m ray_rlhf.train` and its --config/overrides load."""
    from ray_rlhf.cli import train_parser
    from ray_rlhf.config import load_config

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "ray_rlhf.train"], f"not a `python -m ray_rlhf.train` command: {command}"
    args = train_parser().parse_args(argv[3:])
    cfg = load_config(args.config, args.overrides)
    return cfg


def test_rayjob_entrypoint_runs_train_and_config_loads():
    job = rayjob()
    cfg = check_train_command(job["spec"]["entrypoint"])
    gen = groups(job["spec"]["rayClusterSpec"])["generator"]
    assert cfg.pool_max <= gen["maxReplicas"] * gpus(gen["template"]) / max(cfg.generators.num_gpus, 1)
    assert cfg.generators.num_gpus >= 1 and cfg.learner.device == "cuda"
    assert cfg.output_dir.startswith("/mnt/shared/"), "outputs go to the shared volume"


def readme_train_commands() -> list[str]:
    text = (CLUSTERS / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if "python -m ray_rlhf.train" in line:
                commands.append(line[line.index("python -m ray_rlhf.train"):].strip())
    return commands


def test_readme_train_commands_load():
    commands = readme_train_commands()
    assert len(commands) >= 2
    for command in commands:
        check_train_command(command)


def test_readme_names_existing_files_and_the_key_commands():
    text = (CLUSTERS / "README.md").read_text()
    for ref in set(re.findall(r"clusters/[\w./-]+\.(?:yaml|md|py)|clusters/kuberay/Dockerfile", text)):
        assert (ROOT / ref).exists(), f"README names missing file {ref}"
    for needle in (
        "ray up clusters/aws.yaml", "ray up clusters/gcp.yaml", "ray dashboard clusters/aws.yaml",
        "ray job submit --address http://127.0.0.1:8265 --runtime-env clusters/runtime_env.yaml --working-dir .",
        "ray job logs", "ray down clusters/aws.yaml", "kubectl apply -f clusters/kuberay/rayjob.yaml",
        "kubectl logs", "kubectl port-forward", "generators.max", "generators.min",
    ):
        assert needle in text, f"README lacks {needle!r}"
