"""VALDO Task 2 scoring, reproducing the official per-subject rules (contract section 2).

Per case: prediction thresholded at 0.5; connected components (26-connectivity by default); each predicted component
claims the nearest reference component whose centre of mass lies closer than a distance threshold (mm); a reference
claimed several times is one TP (the nearest claim) and the other claims are FP; unclaimed references are FN.
F1 = 2TP / (2TP + FP + FN); Dice is averaged over matched references, each against the union of the predictions that
claimed it; count and volume differences are absolute. An empty reference gives F1 and Dice NaN.
Aggregation: median and IQR per metric (NaN ignored); missing predictions get worst values; pooled sensitivity,
precision and false positives per scan.

CLI: python -m valdocmb.evaluate --reference DIR --prediction DIR [--distance-mm 5] [--connectivity 26] [--csv F]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import CaseError
from .imageio import LABELS_SUFFIX, PROBABILITY_SUFFIX, image_extension, read_mask, strip_image_extension
from .logs import setup_logging

log = logging.getLogger(__name__)

WORST = {"f1": 0.0, "dice": 0.0, "count_diff": 100000.0, "volume_diff": 100000.0}
METRICS = ("dice", "volume_diff", "f1", "count_diff")
CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


@dataclass
class CaseScore:
    subject: str
    status: str           # "ok", "missing" (no prediction), or "error: ..."
    dice: float
    volume_diff: float    # mm^3
    f1: float
    count_diff: float
    n_ref: int
    n_pred: int
    tp: int
    fp: int
    fn: int


def label_components(binary: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    if connectivity not in CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    structure = ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])
    return ndimage.label(binary, structure=structure)


def component_centroids_mm(labels: np.ndarray, n: int, image: sitk.Image) -> np.ndarray:
    """(n, 3) physical centres of mass of components 1..n of a (z, y, x) label array on `image`'s grid."""
    if n == 0:
        return np.zeros((0, 3))
    com_zyx = np.array(ndimage.center_of_mass(np.ones_like(labels, dtype=np.uint8), labels, range(1, n + 1)))
    com_xyz = com_zyx[:, ::-1]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (com_xyz * np.asarray(image.GetSpacing())) @ direction.T


def score_case(reference: sitk.Image, prediction: sitk.Image, subject: str = "", distance_mm: float = 5.0,
               connectivity: int = 26) -> CaseScore:
    """Score one prediction (binary or probability) against a binary reference on the same grid."""
    if reference.GetSize() != prediction.GetSize():
        raise CaseError(f"{subject}: prediction size {prediction.GetSize()} != reference size {reference.GetSize()}")
    if not np.allclose(reference.GetSpacing(), prediction.GetSpacing(), rtol=1e-4):
        raise CaseError(f"{subject}: prediction spacing {prediction.GetSpacing()} != reference {reference.GetSpacing()}")
    ref = sitk.GetArrayFromImage(reference) >= 0.5
    pred_values = sitk.GetArrayFromImage(prediction).astype(np.float64)
    pred = pred_values >= 0.5

    ref_labels, n_ref = label_components(ref, connectivity)
    pred_labels, n_pred = label_components(pred, connectivity)
    ref_centres = component_centroids_mm(ref_labels, n_ref, reference)
    pred_centres = component_centroids_mm(pred_labels, n_pred, reference)

    claims: dict[int, list[int]] = {}  # reference label -> predicted labels that claimed it
    unmatched_preds = 0
    for p in range(n_pred):
        distances = np.linalg.norm(ref_centres - pred_centres[p], axis=1) if n_ref else np.zeros(0)
        candidates = np.flatnonzero(distances < distance_mm)
        if candidates.size == 0:
            unmatched_preds += 1
            continue
        nearest = int(candidates[np.argmin(distances[candidates])])
        claims.setdefault(nearest + 1, []).append(p + 1)
    tp = len(claims)
    fp = unmatched_preds + sum(len(c) - 1 for c in claims.values())
    fn = n_ref - tp

    if n_ref == 0:
        f1 = dice = math.nan
    else:
        f1 = 2 * tp / (2 * tp + fp + fn)
        dices = []
        for ref_label, pred_ids in claims.items():
            ref_mask = ref_labels == ref_label
            pred_mask = np.isin(pred_labels, pred_ids)
            dices.append(2 * np.logical_and(ref_mask, pred_mask).sum() / (ref_mask.sum() + pred_mask.sum()))
        dice = float(np.mean(dices)) if dices else 0.0

    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    volume_diff = abs(float(pred_values[pred].sum()) - float(ref.sum())) * voxel_mm3
    return CaseScore(subject, "ok", dice, volume_diff, f1, float(abs(n_ref - n_pred)), n_ref, n_pred, tp, fp, fn)


def component_evidence(reference: sitk.Image, labels: np.ndarray, n: int, distance_mm: float = 5.0,
                       connectivity: int = 26) -> dict:
    """What `score_case` needs to score any subset of predicted components 1..n (a (z, y, x) label array on the
    reference's grid, labelled with the same connectivity) without the images: the reference components' sizes,
    and for each predicted component its size, the reference it claims (index, or None) and their overlap."""
    ref = sitk.GetArrayFromImage(reference) >= 0.5
    ref_labels, n_ref = label_components(ref, connectivity)
    ref_centres = component_centroids_mm(ref_labels, n_ref, reference)
    pred_centres = component_centroids_mm(labels, n, reference)
    ref_voxels = ndimage.sum(ref, ref_labels, range(1, n_ref + 1)) if n_ref else []
    boxes = ndimage.find_objects(labels, n) if n else []
    components = []
    for p in range(n):
        inside = labels[boxes[p]] == p + 1
        claim, overlap = None, 0
        if n_ref:
            distances = np.linalg.norm(ref_centres - pred_centres[p], axis=1)
            near = np.flatnonzero(distances < distance_mm)
            if near.size:
                claim = int(near[np.argmin(distances[near])])
                overlap = int(np.sum(inside & (ref_labels[boxes[p]] == claim + 1)))
        components.append({"voxels": int(inside.sum()), "claim": claim, "overlap": overlap})
    return {"voxel_mm3": float(np.prod(reference.GetSpacing())), "ref_voxels": [int(v) for v in ref_voxels],
            "components": components}


def score_components(evidence: dict, keep, subject: str = "") -> CaseScore:
    """`score_case` of the prediction made of the kept components only (keep: one bool per component)."""
    kept = [c for c, k in zip(evidence["components"], keep) if k]
    n_ref = len(evidence["ref_voxels"])
    claims: dict[int, list[dict]] = {}
    for component in kept:
        if component["claim"] is not None:
            claims.setdefault(component["claim"], []).append(component)
    tp = len(claims)
    fp = sum(c["claim"] is None for c in kept) + sum(len(c) - 1 for c in claims.values())
    fn = n_ref - tp
    if n_ref == 0:
        f1 = dice = math.nan
    else:
        f1 = 2 * tp / (2 * tp + fp + fn)
        dices = [2 * sum(c["overlap"] for c in claimed)
                 / (evidence["ref_voxels"][ref] + sum(c["voxels"] for c in claimed)) for ref, claimed in claims.items()]
        dice = float(np.mean(dices)) if dices else 0.0
    volume_diff = abs(sum(c["voxels"] for c in kept) - sum(evidence["ref_voxels"])) * evidence["voxel_mm3"]
    return CaseScore(subject, "ok", dice, volume_diff, f1, float(abs(n_ref - len(kept))), n_ref, len(kept), tp, fp, fn)


def missing_score(subject: str, n_ref: int, status: str = "missing") -> CaseScore:
    """Worst values for a case without a usable prediction (every reference lesion is missed)."""
    return CaseScore(subject, status, WORST["dice"], WORST["volume_diff"], WORST["f1"], WORST["count_diff"],
                     n_ref, 0, 0, 0, n_ref)


def summarize(scores: list[CaseScore]) -> dict:
    """Median and IQR (25th, 75th percentile) per metric over cases, and pooled detection figures."""
    summary: dict = {"cases": len(scores)}
    for metric in METRICS:
        values = np.array([getattr(s, metric) for s in scores], float)
        finite = values[~np.isnan(values)]
        if finite.size:
            q1, med, q3 = np.percentile(finite, [25, 50, 75])
            summary[metric] = {"median": float(med), "q1": float(q1), "q3": float(q3), "n": int(finite.size)}
        else:
            summary[metric] = {"median": math.nan, "q1": math.nan, "q3": math.nan, "n": 0}
    tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
    summary["pooled"] = {
        "tp": tp, "fp": fp, "fn": fn,
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "fp_per_scan": fp / len(scores) if scores else math.nan,
    }
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Pairing files by subject id, and the command line

SUBJECT_ID = re.compile(r"(sub-[A-Za-z0-9]+)")
NAME_SUFFIXES = ("_prediction", "_CMB", "_cmb", "_T2S", "_space-T2S", "_desc-masked")


def is_side_output(path: Path, files: set[Path]) -> bool:
    """A component-label or probability map written next to a mask that is among `files` (see `run.sibling`)."""
    stem = strip_image_extension(path.name)
    ext = path.name[len(stem):]
    return any(stem.endswith(suffix) and path.with_name(stem[: -len(suffix)] + ext) in files
               for suffix in (LABELS_SUFFIX, PROBABILITY_SUFFIX))


def subject_id(name: str) -> str:
    """`sub-XXX` when the name has one, else the file stem without our known suffixes."""
    if m := SUBJECT_ID.search(name):
        return m.group(1)
    stem = strip_image_extension(name)
    changed = True
    while changed:
        changed = False
        for suffix in NAME_SUFFIXES:
            if stem.endswith(suffix):
                stem, changed = stem[: -len(suffix)], True
    return stem


def collect(folder: Path, prefer_labels: bool = False) -> dict[str, Path]:
    """Image files in `folder` (and its `images/` subfolder) by subject id; duplicates are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder not found")
    files = [p for sub in (folder, folder / "images") if sub.is_dir()
             for p in sorted(sub.iterdir()) if p.is_file() and image_extension(p) and not p.name.startswith(".")]
    present = set(files)
    files = [p for p in files if not is_side_output(p, present)]
    if prefer_labels and any("_CMB" in p.name for p in files):
        files = [p for p in files if "_CMB" in p.name]  # a VALDO training folder: labels beside the scans
    by_id: dict[str, Path] = {}
    for path in files:
        sid = subject_id(path.name)
        if sid in by_id:
            raise ValueError(f"{folder}: two files for {sid}: {by_id[sid].name} and {path.name}")
        by_id[sid] = path
    return by_id


def _reference_count(reference: sitk.Image, connectivity: int) -> int:
    return label_components(sitk.GetArrayFromImage(reference) >= 0.5, connectivity)[1]


def evaluate_folders(reference_dir: Path, prediction_dir: Path, distance_mm: float = 5.0,
                     connectivity: int = 26) -> list[CaseScore]:
    references = collect(reference_dir, prefer_labels=True)
    predictions = collect(prediction_dir)
    if not references:
        raise ValueError(f"{reference_dir}: no reference images found")
    for extra in sorted(set(predictions) - set(references)):
        log.warning("prediction %s has no reference; ignored", predictions[extra])
    scores = []
    for sid in sorted(references):
        try:
            reference = read_mask(references[sid])
        except CaseError as exc:
            log.error("%s", exc)
            scores.append(missing_score(sid, 0, f"error: {exc}"))
            continue
        if sid not in predictions:
            log.warning("%s: no prediction; scored with worst values", sid)
            scores.append(missing_score(sid, _reference_count(reference, connectivity)))
            continue
        try:
            scores.append(score_case(reference, read_mask(predictions[sid]), sid, distance_mm, connectivity))
        except CaseError as exc:
            log.error("%s", exc)
            scores.append(missing_score(sid, _reference_count(reference, connectivity), f"error: {exc}"))
    return scores


def format_table(scores: list[CaseScore], summary: dict) -> str:
    def num(x, digits=3):
        return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"

    lines = [f"{'subject':<16} {'dice':>6} {'vol_diff':>10} {'f1':>6} {'cnt_diff':>8} "
             f"{'ref':>4} {'pred':>4} {'tp':>3} {'fp':>3} {'fn':>3}  status"]
    for s in scores:
        lines.append(f"{s.subject:<16} {num(s.dice):>6} {num(s.volume_diff, 1):>10} {num(s.f1):>6} "
                     f"{num(s.count_diff, 0):>8} {s.n_ref:>4} {s.n_pred:>4} {s.tp:>3} {s.fp:>3} {s.fn:>3}  {s.status}")
    lines.append("")
    lines.append(f"{'metric':<12} {'median':>10} {'IQR (q1 - q3)':>24}  n")
    for metric in METRICS:
        m = summary[metric]
        lines.append(f"{metric:<12} {num(m['median']):>10} {num(m['q1']):>11} - {num(m['q3']):<11} {m['n']}")
    p = summary["pooled"]
    lines.append("")
    lines.append(f"pooled over {summary['cases']} scans: TP {p['tp']}  FP {p['fp']}  FN {p['fn']}  "
                 f"sensitivity {num(p['sensitivity'])}  precision {num(p['precision'])}  "
                 f"FP/scan {num(p['fp_per_scan'], 2)}")
    return "\n".join(lines)


def write_csv(scores: list[CaseScore], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(scores[0]).keys()) if scores else ["subject"])
        writer.writeheader()
        for s in scores:
            writer.writerow(asdict(s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valdocmb.evaluate", description=__doc__.split("\n\n")[0])
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
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if all(s.status == "ok" for s in scores) else 1


if __name__ == "__main__":
    sys.exit(main())
