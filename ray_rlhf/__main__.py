import sys

from ray_rlhf.cli import main

sys.exit(main())
