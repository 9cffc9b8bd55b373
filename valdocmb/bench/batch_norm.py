"""The batch-norm reference of the three-stage weights, for `--batch-norm scan` (test-time adaptation).

    python -m valdocmb.bench.batch_norm --weights weights --data SCANS [--data MORE ...]

For every scan (`*_T2S.nii.gz` or any NIfTI in each SCANS folder: simulated scans like the training data that no
reported figure uses, e.g. `valdocmb-synth --seed 41` with the standard and the randomised profile), the weights'
own pipeline finds its candidates, and the input moments of every batch norm are summed over the crops and patches
`core.adaptation` draws (screening: brain crops; discrimination: the candidates' patches), through the trained
networks. The sums go into the weights' MANIFEST.json under `batch_norm_reference`, tied to the weights' version:
new weights need a new reference.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..core import manifest
from ..core.imageio import read_scan
from ..core.logs import setup_logging
from ..core.manifest import command_line
from .int8 import scans_in

log = logging.getLogger("valdocmb.batch_norm")


def reference(weights: Path, folders: list[Path]) -> dict:
    from ..core import adaptation
    from ..core.three_stage import ThreeStagePipeline
    from ..models.discrimination import DiscriminationCNN

    pipeline = ThreeStagePipeline.from_weights(weights, "cpu", precision="auto", runtime="auto")
    scans = [scan for folder in folders for scan in scans_in(folder)]
    if not scans:
        raise SystemExit(f"{', '.join(map(str, folders))}: no scan")
    totals: dict[str, list[np.ndarray]] = {}
    for number, path in enumerate(scans, 1):
        start = time.perf_counter()
        detection = pipeline.detect(read_scan(path), {})
        pre = detection.preprocessed
        inputs = {"screening": adaptation.screening_crops(pre.array, pre.foreground),
                  "discrimination": adaptation.discrimination_patches(
                      pre.array, [c.centre for c in detection.candidates], DiscriminationCNN.patch_size)}
        for name, batch in inputs.items():
            if batch is None:
                continue
            found = adaptation.reference_moments(getattr(pipeline, name), [batch])
            totals[name] = [a + b for a, b in zip(totals[name], found)] if name in totals else found
        log.info("[%d/%d] %s: %d candidates, %.0f s", number, len(scans), path.name, len(detection.candidates),
                 time.perf_counter() - start)
    missing = {"screening", "discrimination"} - set(totals)
    if missing:
        raise SystemExit(f"no scan gave {' or '.join(sorted(missing))} items (discrimination needs "
                         f"{adaptation.MIN_CANDIDATES} candidates in a scan)")
    return {"weights": pipeline.weights_info["version"],
            "moments": {name: [m.round(6).tolist() for m in layers] for name, layers in totals.items()},
            "made_on": {"data": [str(f) for f in folders], "scans": [p.name for p in scans],
                        "screening_crop": list(adaptation.SCREENING_CROP),
                        "crops_per_scan": adaptation.SCREENING_CROPS, "patches_per_scan": adaptation.MAX_CANDIDATES}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valdocmb.bench.batch_norm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="folder of reference scans like the training data (never reported ones); repeatable")
    args = parser.parse_args(argv)
    setup_logging()
    from ..core.three_stage import BATCH_NORM_KEY

    made = {**reference(args.weights, args.data), "command": command_line("python -m valdocmb.bench.batch_norm", argv)}
    manifest.update(args.weights, lambda content: content.update({BATCH_NORM_KEY: made}))
    log.info("batch-norm reference for weights %s written to %s", made["weights"], manifest.manifest_path(args.weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
