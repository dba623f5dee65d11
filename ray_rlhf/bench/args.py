"""The command line of ``ray-rlhf bench`` (light: the CLI builds it without importing Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ray_rlhf.errors import UserError


def build_parser(prog: str = "ray-rlhf bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Benchmark a run's config: phases, bound, MFU, weight sync, memory.")
    ap.add_argument("--config", default=None,
                    help="preset name or YAML file of the run to measure (default: small; tiny with --quick)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    ap.add_argument("--quick", action="store_true", help="few steps, one sync size (tiny preset by default, < 3 min)")
    ap.add_argument("--learner-packing", action="store_true",
                    help="only the learner's update, packed sequences off and on, on long-tailed response lengths")
    ap.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                    help="run the end-to-end section once per value of one config key, e.g. generators.num=1,2,4")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default bench-results/<timestamp>)")
    ap.add_argument("--steps", type=int, default=None, help="PPO steps end to end (default: 8 full, 3 quick)")
    ap.add_argument("--cache-dir", default=None,
                    help="where offline preset models are built once (default: the config's model.cache_dir)")
    ap.add_argument("--ray-address", default=None,
                    help="Ray cluster to run on (default: RAY_ADDRESS if set, else a private local Ray)")
    return ap


def parse_sweep(text: str | None) -> tuple[str, list[str]] | None:
    """``"generators.num=1,2,4"`` -> ``("generators.num", ["1", "2", "4"])``."""
    if not text:
        return None
    key, sep, values = text.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not vals:
        raise UserError(f"--sweep {text!r}: expected KEY=V1,V2,... (e.g. --sweep generators.num=1,2,4)")
    return key.strip(), vals


