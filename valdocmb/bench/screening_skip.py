"""Could a cheap darkness test let screening skip blocks? A measurement, not a runtime option.

    python -m valdocmb.bench.screening_skip SCAN [SCAN ...] [--weights weights] [--json FILE]

Screening computes C1-C2 in blocks of pooled features wherever a brain score reads them (`ThreeStagePipeline.screen`).
A pre-test that rules out score positions which cannot reach the screening threshold would let a block be skipped
when no position within reach passes. For each scan this runs the weights' screening (OpenVINO bfloat16 where
available), takes the positions at or above the threshold, and reports:

- the oracle: the share of blocks those positions alone read (what a perfect pre-test would keep);
- for a darkness test "the darkest voxel within a window around the position is at most t" (intensities are the
  preprocessed z-scores), the loosest t that keeps every position above threshold, and the shares of positions and
  blocks that test keeps; the same by distance to the brain mask's edge.

A test that keeps every block saves nothing; screening stays exhaustive unless this shows otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..core.imageio import write_text_atomic
from ..core.logs import setup_logging

WINDOWS = ((3, 5, 5), (5, 7, 7), (7, 11, 11), (9, 15, 15))    # (z, y, x) processing voxels around a score position
EDGE_BANDS_MM = ((0, 2), (2, 4), (4, 8), (8, 1000))


def measure(pipeline, path: Path) -> dict:
    from scipy import ndimage

    from ..core.imageio import read_scan
    from ..core.preprocess import preprocess
    from ..core.three_stage import blocks_read_by
    from ..models.screening import ScreeningFCN

    pre = preprocess(read_scan(path), pipeline.config.target_spacing)
    stride, reach, block = ScreeningFCN.stride, ScreeningFCN.pooled_window - 1, pipeline.config.screening_block
    scores = pipeline.screen(pre.array, pre.foreground)
    brain = pre.foreground[::stride, ::stride, ::stride]
    above = scores >= pipeline.config.screening_threshold
    blocks = -(-(np.array(scores.shape) + reach) // block)

    every = blocks_read_by(brain, reach, block, blocks).sum()

    def block_share(kept: np.ndarray) -> float:
        return float(blocks_read_by(kept, reach, block, blocks).sum() / every)

    edge_mm = ndimage.distance_transform_edt(pre.foreground, sampling=pipeline.config.target_spacing)
    edge_mm = edge_mm[::stride, ::stride, ::stride]
    row: dict = {"scan": path.name, "brain_positions": int(brain.sum()), "above_threshold": int(above.sum()),
                 "threshold": pipeline.config.screening_threshold, "oracle_block_share": round(block_share(above), 4),
                 "darkness": []}
    for window in WINDOWS:
        darkest = ndimage.minimum_filter(pre.array, window)[::stride, ::stride, ::stride]
        loosest = float(darkest[above].max()) if above.any() else float("-inf")
        kept = brain & (darkest <= loosest)
        bands = {f"{lo}-{hi} mm": {"above": int((sel := above & (edge_mm >= lo) & (edge_mm < hi)).sum()),
                                   "darkest_max": round(float(darkest[sel].max()), 2) if sel.any() else None}
                 for lo, hi in EDGE_BANDS_MM}
        row["darkness"].append({"window": list(window), "loosest_t": round(loosest, 2),
                                "position_share": round(float(kept.sum() / brain.sum()), 4),
                                "block_share": round(block_share(kept), 4), "by_edge_distance": bands})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     prog="python -m valdocmb.bench.screening_skip")
    parser.add_argument("scans", nargs="+", type=Path)
    parser.add_argument("--weights", type=Path, default=Path(__file__).resolve().parents[2] / "weights")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    from ..core.three_stage import ThreeStagePipeline

    pipeline = ThreeStagePipeline.from_weights(args.weights, "cpu", precision="auto", runtime="auto")
    rows = []
    for path in args.scans:
        row = measure(pipeline, path)
        rows.append(row)
        print(f"{row['scan']}: {row['above_threshold']} of {row['brain_positions']} brain positions at or above "
              f"{row['threshold']:.3g}; a perfect pre-test keeps {row['oracle_block_share']:.0%} of the blocks")
        for test in row["darkness"]:
            print(f"  darkest voxel in {'x'.join(map(str, test['window']))} <= {test['loosest_t']:+.2f}: keeps "
                  f"{test['position_share']:.1%} of positions, {test['block_share']:.1%} of blocks; deepest band's "
                  f"darkest voxel up to {test['by_edge_distance']['8-1000 mm']['darkest_max']}")
    if args.json:
        write_text_atomic(json.dumps({"weights": str(args.weights), "scans": rows}, indent=1) + "\n", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
