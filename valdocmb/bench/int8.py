"""INT8 calibration of the three-stage weights for `--precision int8` (OpenVINO on a CPU).

    python -m valdocmb.bench.int8 --weights weights --data SCANS [--crops 8]

For every scan (`*_T2S.nii.gz` or any NIfTI in SCANS; simulated scans that no reported figure uses, e.g. the
weights evaluation's tuning set `valdocmb-synth --seed 31`), the weights' own pipeline (bfloat16) finds its
candidates; the screening network then runs in float32 over random brain crops and crops around those candidates,
and the discrimination network over the candidates' patches, recording every convolution's input range. The ranges
(widened by `openvino_runtime.input_ranges`'s margin) go into the weights' MANIFEST.json under `int8_calibration`,
tied to the weights' version: new weights need a new calibration. Whether int8 may become a default is decided by
comparing masks on hold-out scans (`valdocmb-benchmark --scan ... --variants three-stage:openvino-bfloat16
three-stage:openvino-int8`); docs/results.md has the figures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..core import manifest
from ..core.imageio import image_extension, read_scan
from ..core.logs import setup_logging
from ..core.manifest import command_line

log = logging.getLogger("valdocmb.int8")
CROP = (40, 64, 64)            # screening crops (z, y, x processing voxels): whole score neighbourhoods
PATCHES = 256                  # candidates' discrimination patches per scan, at most


def scans_in(folder: Path) -> list[Path]:
    found = sorted(p for p in Path(folder).iterdir() if image_extension(p) and not p.name.endswith("_CMB.nii.gz"))
    return [p for p in found if "_T2S" in p.name] or found


def crops_around(volume: np.ndarray, centres: np.ndarray, shape=CROP) -> np.ndarray:
    from ..core.patches import extract_patches
    return extract_patches(volume, np.asarray(centres, int).reshape(-1, 3), shape)


def calibrate(weights: Path, data: Path, crops: int, seed: int = 0) -> dict:
    import torch

    from ..core.openvino_runtime import input_ranges
    from ..core.three_stage import ThreeStagePipeline
    from ..models.discrimination import DiscriminationCNN

    pipeline = ThreeStagePipeline.from_weights(weights, "cpu", precision="bfloat16", runtime="auto")
    screening, discrimination = pipeline.screening, pipeline.discrimination
    rng = np.random.default_rng(seed)
    ranges: dict[str, list[list[float]]] = {}
    scans = scans_in(data)
    if not scans:
        raise SystemExit(f"{data}: no scan")
    for number, path in enumerate(scans, 1):
        start = time.perf_counter()
        detection = pipeline.detect(read_scan(path), {})
        volume, brain = detection.preprocessed.array, detection.preprocessed.foreground
        centres = np.array([c.centre for c in detection.candidates] or [tuple(np.array(volume.shape) // 2)])
        centres = centres[rng.choice(len(centres), min(len(centres), PATCHES), replace=False)]
        inside = np.argwhere(brain)
        chosen = np.concatenate([inside[rng.choice(len(inside), crops)],
                                 centres[rng.choice(len(centres), min(crops, len(centres)), replace=False)]])
        batches = {
            "screening": (list(screening.features), [torch.from_numpy(crops_around(volume, chosen))[:, None]]),
            "discrimination": ([*discrimination.features, discrimination.classifier],
                               [torch.from_numpy(crops_around(volume, part, DiscriminationCNN.patch_size))[:, None]
                                for part in np.array_split(centres, max(1, len(centres) // 64))]),
        }
        for name, (modules, inputs) in batches.items():
            found = input_ranges(modules, inputs)
            ranges[name] = [[min(a[0], b[0]), max(a[1], b[1])] for a, b in zip(ranges[name], found)] \
                if name in ranges else found
        log.info("[%d/%d] %s: %d candidates, %.0f s", number, len(scans), path.name, len(detection.candidates),
                 time.perf_counter() - start)
    return {"weights": pipeline.weights_info["version"], "ranges": ranges,
            "calibrated_on": {"data": str(data), "scans": [p.name for p in scans], "crops_per_scan": 2 * crops}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valdocmb.bench.int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--data", type=Path, required=True, help="folder of calibration scans (never reported ones)")
    parser.add_argument("--crops", type=int, default=8,
                        help="screening crops per scan at random brain voxels, and as many at candidates")
    args = parser.parse_args(argv)
    setup_logging()
    from ..core.three_stage import INT8_KEY

    calibration = {**calibrate(args.weights, args.data, args.crops),
                   "command": command_line("python -m valdocmb.bench.int8", argv)}
    manifest.update(args.weights, lambda content: content.update({INT8_KEY: calibration}))
    log.info("int8 calibration for weights %s written to %s", calibration["weights"],
             manifest.manifest_path(args.weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
