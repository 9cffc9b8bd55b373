"""`valdocmb-evaluate` (`python -m valdocmb.evaluate`): score a folder of predictions against a folder of references
with the official VALDO Task 2 rules (see `valdocmb.evaluate.scoring`).

    valdocmb-evaluate --reference DIR --prediction DIR [--distance-mm 5] [--connectivity 26] [--csv F] [--json F]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..core.imageio import write_text_atomic
from ..core.logs import setup_logging
from .folders import evaluate_folders, format_table, write_csv
from .scoring import summarize

log = logging.getLogger("valdocmb.evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="folder of reference masks (*_CMB.nii.gz)")
    parser.add_argument("--prediction", required=True, type=Path, help="folder of predictions (or its images/)")
    parser.add_argument("--distance-mm", type=float, default=5.0, help="centroid matching distance (default 5 mm)")
    parser.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26))
    parser.add_argument("--csv", type=Path, help="write per-case metrics to this CSV")
    parser.add_argument("--json", type=Path, help="write the summary (median/IQR, pooled) to this JSON")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        scores = evaluate_folders(args.reference, args.prediction, args.distance_mm, args.connectivity)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    summary = summarize(scores)
    print(format_table(scores, summary))
    if args.csv:
        write_csv(scores, args.csv)
    if args.json:
        write_text_atomic(json.dumps(summary, indent=2), args.json)
    return 0 if all(s.status == "ok" for s in scores) else 1


if __name__ == "__main__":
    sys.exit(main())
