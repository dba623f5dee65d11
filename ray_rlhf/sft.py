"""``python -m ray_rlhf.sft key=value ...``: the ``ray-rlhf sft`` command (for ``ray job submit``)."""

import sys

from ray_rlhf.run.command import run_command
from ray_rlhf.stages.command import main

if __name__ == "__main__":
    sys.exit(run_command(lambda argv: main("sft", argv), sys.argv[1:]))
