"""`python -m valdocmb.nnunet_train`, kept working: the command `valdocmb-nnunet-train`,
whose code is valdocmb/train/nnunet.py."""

import sys

from valdocmb.train.nnunet import main

if __name__ == "__main__":
    sys.exit(main())
