"""``python -m ray_rlhf.train --config tiny [key.sub=value ...]``: the entry point that
``ray job submit`` runs (same as ``ray-rlhf train``). The loop itself is :mod:`ray_rlhf.run.driver`."""

import sys

from ray_rlhf.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
