"""`python -m valdocmb.nnunet_benchmark`, kept working: the command `valdocmb-nnunet-benchmark`,
whose code is valdocmb/bench/nnunet.py."""

import sys

from valdocmb.bench.nnunet import main

if __name__ == "__main__":
    sys.exit(main())
