"""``python -m ray_rlhf.dpo key=value ...``: the ``ray-rlhf dpo`` command (for ``ray job submit``)."""

import sys

from ray_rlhf.run.command import run_command
from ray_rlhf.stages.command import main

if __name__ == "__main__":
    sys.exit(run_command(lambda argv: main("dpo", argv), sys.argv[1:]))
