#!/usr/bin/env python3
"""Container entrypoint: segment cerebral microbleeds in /input, write masks to /output.

    python process.py [--input DIR] [--output DIR] [--method three-stage|nnunet|ensemble] [--device auto|cpu|cuda]
    python process.py --serve [--port 4743] ...    grand-challenge's invoke mode: GET /health, POST /invoke

See `python process.py --help` and the README for the layouts and options.
"""

import sys

from valdocmb.core.run import main

if __name__ == "__main__":
    sys.exit(main())
