"""Private-inference latency of the demo models under network profiles (deploy/bench/latency.py).

    python benchmarks/network_profiles.py [--models fashion_cnn tiny_resnet] [--profiles loopback lan wan mobile]
        [--batch 1] [--reps 2] [--sweep] [--kernel] [--out results/network]
"""

import sys

from twinfer.deploy.bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
