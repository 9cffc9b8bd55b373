"""Score the three-stage pipeline after each stage on labelled cases, per acquisition grid.

    python -m valdocmb.stagewise --data DIR [--weights weights] [--device auto] [--max-cases N] [--json F]

Stage outputs scored with the VALDO rules: "screening" = every candidate after non-maximum suppression, drawn as a
sphere of --mark-radius mm (the mean annotated CMB radius, 1.5 mm); "discrimination" = the confirmed candidates,
drawn the same way; "segmentation" = the pipeline's final mask. Grids come from the simulator's *_sim.json
(acquisition.grid), else "all".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .evaluate import format_table, score_case, summarize
from .imageio import read_mask, read_scan
from .logs import setup_logging
from .run import default_weights_dir
from .samples import find_training_cases
from .three_stage import ThreeStagePipeline
from .weights import MANIFEST

log = logging.getLogger("valdocmb.stagewise")
STAGES = ("screening", "discrimination", "segmentation")


def spheres(shape, centres, spacing_zyx, radius_mm: float) -> np.ndarray:
    marks = np.zeros(shape, np.float32)
    r = np.ceil(radius_mm / np.asarray(spacing_zyx)).astype(int)
    offsets = np.argwhere(np.ones(2 * r + 1, bool)) - r
    inside = offsets[np.sum((offsets * spacing_zyx) ** 2, axis=1) <= radius_mm**2]
    for centre in centres:
        points = inside + np.asarray(centre)
        ok = np.all((points >= 0) & (points < shape), axis=1)
        marks[tuple(points[ok].T)] = 1.0
    return marks


def stage_masks(pipeline: ThreeStagePipeline, image: sitk.Image, radius_mm: float) -> tuple[dict, dict]:
    timings: dict = {}
    final = pipeline.segment(image, timings).mask
    detection = pipeline.last_detection
    pre = detection.preprocessed
    spacing_zyx = np.array(pre.grid.spacing)[::-1]
    masks = {}
    for stage, found in (("screening", detection.candidates), ("discrimination", detection.survivors)):
        marks = spheres(pre.array.shape, [c.centre for c in found], spacing_zyx, radius_mm)
        masks[stage] = pre.to_original(marks, "nearest")
    masks["segmentation"] = final
    return masks, timings


def grid_of(scan: Path, subject: str) -> str:
    sim = scan.with_name(f"{subject}_space-T2S_sim.json")
    return json.loads(sim.read_text())["acquisition"]["grid"] if sim.is_file() else "all"


def evaluate_stages(pipeline, cases, radius_mm: float = 1.5, distance_mm: float = 5.0) -> list[dict]:
    rows = []
    for i, (subject, scan, label) in enumerate(cases, 1):
        start = time.perf_counter()
        reference = read_mask(label)
        masks, timings = stage_masks(pipeline, read_scan(scan), radius_mm)
        row = {"subject": subject, "grid": grid_of(scan, subject), "seconds": time.perf_counter() - start,
               "timings": timings}
        for stage in STAGES:
            row[stage] = score_case(reference, masks[stage], subject, distance_mm)
        s = row["segmentation"]
        log.info("[%d/%d] %s %s: ref %d, cand %d, conf %d, seg %d (TP %d FP %d)  %.1f s", i, len(cases), subject,
                 row["grid"], s.n_ref, row["screening"].n_pred, row["discrimination"].n_pred, s.n_pred, s.tp, s.fp,
                 row["seconds"])
        rows.append(row)
    return rows


def report(rows: list[dict]) -> dict:
    out = {}
    grids = sorted({r["grid"] for r in rows})
    for grid in grids + (["all"] if len(grids) > 1 else []):
        subset = [r for r in rows if grid == "all" or r["grid"] == grid]
        out[grid] = {"cases": len(subset), "seconds_per_case": float(np.mean([r["seconds"] for r in subset]))}
        for stage in STAGES:
            scores = [r[stage] for r in subset]
            out[grid][stage] = summarize(scores)
            print(f"\n=== grid {grid} ({len(subset)} cases), after {stage} ===")
            print(format_table(scores, out[grid][stage]).split("\n\n", 1)[1])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valdocmb.stagewise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--mark-radius", type=float, default=1.5)
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--record", action="store_true",
                        help="record the figures as the validation entry of the weights' MANIFEST.json")
    args = parser.parse_args(argv)
    setup_logging()
    weights = args.weights or default_weights_dir()
    pipeline = ThreeStagePipeline.from_weights(weights, args.device)
    cases = find_training_cases(args.data)[: args.max_cases]
    rows = evaluate_stages(pipeline, cases, args.mark_radius)
    summary = report(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=float))
    if args.record:
        record_validation(weights / MANIFEST, summary, args, [c[0] for c in cases], str(pipeline.device))
    return 0


def record_validation(manifest_path: Path, summary: dict, args, subjects: list[str], device: str) -> None:
    """Store the figures under "validation" in the manifest (NaN written as null)."""
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
    clean = json.loads(json.dumps(summary, default=float).replace("NaN", "null"))
    manifest["validation"] = {
        "data": str(args.data), "subjects": subjects, "device": device,
        "command": "python -m valdocmb.stagewise " + " ".join(sys.argv[1:]),
        "note": "simulated hold-out cases never used in training; per grid and after each stage",
        "summary": clean,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    sys.exit(main())
