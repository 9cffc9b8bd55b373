"""Measure nnU-Net's inference options (test-time mirroring, tile step) on one scan, in one run.

    valdocmb-nnunet-benchmark [--scan FILE] [--crop X0 X1 Y0 Y1] [--device cpu] [--weights weights]

Each variant segments the same scan with the shipped model; printed per variant: seconds, the ratio to the first
variant (the defaults), voxels at probability >= 0.5 and the largest probability change against the defaults.
The choice of defaults (docs/methods.md) comes from this. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.defaults import NNUNET_MIRRORING as DEFAULT_MIRRORING
from ..core.defaults import NNUNET_TILE_STEP as DEFAULT_TILE_STEP
from ..core.imageio import write_text_atomic
from ..core.logs import setup_logging
from ..core.weights import default_weights_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "tests/data/example/input/sub-001_space-T2S_desc-masked_T2S.nii.gz"
VARIANTS = ((DEFAULT_TILE_STEP, DEFAULT_MIRRORING), (DEFAULT_TILE_STEP, not DEFAULT_MIRRORING), (0.75, False),
            (1.0, False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-nnunet-benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=Path, default=EXAMPLE)
    parser.add_argument("--crop", type=int, nargs=4, default=(32, 96, 40, 104), metavar=("X0", "X1", "Y0", "Y1"),
                        help="in-plane voxel range kept (default: 64x64 of the example); 0 0 0 0 keeps all")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--weights", type=Path, default=default_weights_dir())
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from ..core.nnunet import NnUNetMethod  # torch and nnU-Net: imported once --help is past

    setup_logging()
    scan = sitk.ReadImage(str(args.scan), sitk.sitkFloat32)
    x0, x1, y0, y1 = args.crop
    if x1 > x0 and y1 > y0:
        scan = scan[x0:x1, y0:y1, :]
    print(f"{args.scan.name}: {'x'.join(map(str, scan.GetSize()))} voxels, device {args.device}", flush=True)
    rows: list[dict] = []
    reference, base = None, 1.0  # the first setting's (set on the first pass)
    for step, mirroring in VARIANTS:
        method = NnUNetMethod.from_weights(args.weights, args.device, tile_step=step, mirroring=mirroring)
        start = time.perf_counter()
        probability = sitk.GetArrayFromImage(method.probability(scan, {}))
        seconds = time.perf_counter() - start
        if reference is None:
            reference, base = probability, seconds
        row = {"tile_step": step, "mirroring": mirroring, "seconds": round(seconds, 2),
               "ratio": round(seconds / base, 2), "voxels_at_0.5": int((probability >= 0.5).sum()),
               "max_change": round(float(np.abs(probability - reference).max()), 3)}
        rows.append(row)
        print(f"tile step {step:<4} mirroring {'on ' if mirroring else 'off'}: {seconds:7.1f} s (x{row['ratio']:.2f}), "
              f"{row['voxels_at_0.5']} voxels >= 0.5, largest change vs. the first {row['max_change']:.3f}",
              flush=True)
    if args.json:
        write_text_atomic(json.dumps(rows, indent=1), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
