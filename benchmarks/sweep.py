"""A sweep of models x batch sizes x network profiles as Ray tasks, as `twinfer bench sweep` (deploy/bench/sweep.py).

    python benchmarks/sweep.py --config sweep.yaml [--out results/] [--ray-address auto]
"""

import sys

from twinfer.deploy.cli.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sweep", *sys.argv[1:]]))
