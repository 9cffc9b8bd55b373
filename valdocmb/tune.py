"""`python -m valdocmb.tune`, kept working: the command `valdocmb-tune`, whose code is valdocmb/train/tune.py."""

import sys

from valdocmb.train.tune import main

if __name__ == "__main__":
    sys.exit(main())
