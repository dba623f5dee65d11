"""ray_rlhf.algo is pure math: torch and the standard library only."""

import ast
import subprocess
import sys
from pathlib import Path

import ray_rlhf.algo

ALGO_DIR = Path(ray_rlhf.algo.__file__).parent
FORBIDDEN = ("ray", "vllm", "transformers", "ray_rlhf.config", "pydantic")


def test_importing_algo_pulls_in_no_framework():
    code = (
        "import sys, ray_rlhf.algo\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m in {FORBIDDEN!r}]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"ray_rlhf.algo imported: {out.stdout.strip()}"


def test_algo_sources_import_only_torch_stdlib_and_algo():
    for path in sorted(ALGO_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = top == "torch" or top in sys.stdlib_module_names or name.startswith("ray_rlhf.algo")
                assert ok, f"{path.name} imports {name}"


def test_the_config_reads_the_registry_without_importing_torch():
    """``ray_rlhf.config`` checks estimator names, placements and aggregations against the
    registry's traits without importing torch (~1.5 s): a config mistake on the command line is
    reported before anything heavy loads. The math itself still comes when first used."""
    code = ("import sys, ray_rlhf.config\n"
            "from ray_rlhf.config import load_config\n"
            "load_config('tiny', ['algo.estimator=grpo', 'rollout.samples_per_prompt=4'])\n"
            "print('torch' in sys.modules)\n"
            "from ray_rlhf.algo.registry import get_estimator\n"
            "get_estimator('grpo').fn\n"
            "from ray_rlhf.algo import gae\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stdout
