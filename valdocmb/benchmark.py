"""`python -m valdocmb.benchmark`, kept working: the command `valdocmb-benchmark`,
whose code is valdocmb/bench/three_stage.py."""

import sys

from valdocmb.bench.three_stage import main

if __name__ == "__main__":
    sys.exit(main())
