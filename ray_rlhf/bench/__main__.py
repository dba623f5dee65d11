"""``python -m ray_rlhf.bench [--config ...] [overrides] [--sweep KEY=V1,V2]``: ``ray-rlhf bench``
in a form for ``ray job submit`` (see :mod:`ray_rlhf.bench.run`)."""

import logging
import sys

from ray_rlhf.bench.args import build_parser
from ray_rlhf.bench.run import run_bench
from ray_rlhf.run.command import run_command

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_command(run_bench, build_parser("python -m ray_rlhf.bench").parse_args()))
