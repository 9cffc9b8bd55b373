"""`python -m valdocmb.compare`, kept working: the command `valdocmb-compare`,
whose code is valdocmb/train/compare.py."""

import sys

from valdocmb.train.compare import main

if __name__ == "__main__":
    sys.exit(main())
