"""Time each three-stage step on a real-sized synthetic volume and report the process's peak memory.

    valdocmb-benchmark [--size 512 512 192] [--spacing 0.488 0.488 0.8] [--device cpu] [--candidates 100]

The volume is an ellipsoidal head of noisy tissue (about 60 % of the field of view is brain, as in VALDO scans).
With --weights the trained networks are used; otherwise randomly initialised ones, and since an untrained
screening net passes almost everything, discrimination and segmentation are then timed on the top --candidates
candidates (a trained pipeline typically passes tens to a few hundred). This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.models.segmentation import SegmentationUNet

from ..core.device import resolve_device
from ..core.logs import setup_logging
from ..core.preprocess import preprocess
from ..core.three_stage import ThreeStageConfig, ThreeStagePipeline

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_head(size, spacing, seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    shape = tuple(reversed(size))
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = (zz / 0.95) ** 2 + (yy / 0.85) ** 2 + (xx / 0.75) ** 2 < 1.0
    array = np.where(inside, rng.normal(100.0, 8.0, shape).astype(np.float32), np.float32(0))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(spacing))
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 192), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.488, 0.488, 0.8))
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--weights", type=Path, help="trained weights folder (default: random networks)")
    parser.add_argument("--candidates", type=int, default=100, help="candidates timed in stages 3-4")
    parser.add_argument("--tile", type=int, nargs=3, default=None, help="screening tile in score voxels (z y x)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    setup_logging()

    config = ThreeStageConfig()
    if args.tile:
        config.tile = tuple(args.tile)
    device = resolve_device(args.device)
    if args.weights:
        pipeline = ThreeStagePipeline.from_weights(args.weights, str(device), config)
    else:
        torch.manual_seed(0)
        pipeline = ThreeStagePipeline(ScreeningFCN(), DiscriminationCNN(), SegmentationUNet(), device, config)

    image = synthetic_head(args.size, args.spacing)
    log.info("benchmark: %s voxels at %s mm on %s (%d CPU threads), base memory %.0f MB",
             "x".join(map(str, args.size)), args.spacing, device, torch.get_num_threads(), peak_rss_mb())
    rows = []

    def stage(name, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        rows.append({"stage": name, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb()),
                     "peak_gpu_mb": round(gpu) if gpu is not None else None})
        log.info("%-16s %8.2f s   peak RSS %6.0f MB%s", name, seconds, peak_rss_mb(),
                 f"   peak GPU {gpu:.0f} MB" if gpu is not None else "")
        return result

    total_start = time.perf_counter()
    pre = stage("preprocess", lambda: preprocess(image, config.target_spacing))
    scores = stage("screening", lambda: pipeline.screen(pre.array, pre.foreground))
    candidates = stage("candidates", lambda: pipeline.find_candidates(scores))
    timed_candidates = candidates[: args.candidates]
    centres = [c.centre for c in timed_candidates]
    stage("discrimination", lambda: pipeline.discriminate(pre.array, centres))
    probability = stage("segmentation", lambda: pipeline.segment_candidates(pre.array, centres) * pre.foreground)
    stage("to_input_grid", lambda: pre.to_original(probability, "linear") >= config.segmentation_threshold)
    total = time.perf_counter() - total_start

    summary = {
        "size": list(args.size), "spacing": list(args.spacing), "device": str(device),
        "threads": torch.get_num_threads(), "processing_grid": list(pre.array.shape[::-1]),
        "candidates_found": len(candidates), "candidates_timed": len(timed_candidates),
        "weights": str(args.weights) if args.weights else "random", "stages": rows,
        "total_seconds": round(total, 2), "peak_rss_mb": round(peak_rss_mb()),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
