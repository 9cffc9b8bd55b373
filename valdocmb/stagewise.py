"""`python -m valdocmb.stagewise`, kept working: the command `valdocmb-stagewise`,
whose code is valdocmb/train/stagewise.py."""

import sys

from valdocmb.train.stagewise import main

if __name__ == "__main__":
    sys.exit(main())
