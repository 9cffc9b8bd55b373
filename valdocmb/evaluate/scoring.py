"""VALDO Task 2 scoring: the one scoring core, bit for bit the official code's per-subject rules.

The official code is WhereIsValdo/valdo-eval-2021 (`compare_segmentations.py -task microbleeds -c 3 -m 5`:
26-connectivity, 5 mm). What it does, and so what this module does, per subject:

- the reference is rounded to one decimal (`np.around(ref, 1)`); its non-zero voxels are the lesions, and each
  reference lesion weighs its highest value (1 for a binary label); the prediction is thresholded at 0.5 and
  keeps its values where >= 0.5 for the volume;
- connected components are labelled on the arrays in (x, y, z) index order, as nibabel holds a NIfTI file, so
  components are numbered by their first voxel in x, then y, then z order;
- centres of mass are index coordinates times the voxel size (the direction matrix and origin play no part), and
  distances are Euclidean (`scipy.spatial.distance.cdist`); a predicted component may claim the references
  closer than the threshold (strictly), and claims the nearest; between equally near references the first in
  that label order wins;
- a reference claimed once gives a TP; claimed several times, **every** claim at the smallest distance is a TP
  (an exact tie gives two TPs for one reference) and the others are FPs; unclaimed predictions are FPs;
- F1 = 2 wTP / (2 wTP + FP + wFN), wTP and wFN summing the weights of the TP rows and of the unclaimed
  references; Dice is averaged over the references with a TP, each reference (its values) against the union of
  every prediction that claimed it; count difference |#ref - #pred|; volume difference
  |sum(kept prediction values) - sum(reference)| x voxel volume, the voxel volume a float32 product of the voxel
  sizes (NIfTI stores them as float32; the official code multiplies them as such, and numpy 1.x, which it ran
  with in 2021, multiplies that by the difference in float64);
- an empty reference gives F1 and Dice NaN; an empty prediction with a non-empty reference gives 0.

`component_evidence` reduces a case to what scoring needs per predicted component, so that any subset of the
components (a lesion rule's choice) is scored without the images, exactly as `score_case` scores the mask made of
that subset: `score_case` itself goes through the same evidence. Every figure is bit-exact with the official code on
NIfTI files (voxel sizes are taken as float32, as NIfTI stores them, whatever the file); a subset of a probability
map's components sums their values in float64 for the volume (float rounding only; the pipeline's masks are
binary, where it is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from ..core.errors import CaseError

WORST = {"f1": 0.0, "dice": 0.0, "count_diff": 100000.0, "volume_diff": 100000.0}
METRICS = ("dice", "volume_diff", "f1", "count_diff")
CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}
# bump when the evidence's content changes: cached evidence of another version is computed again
EVIDENCE_VERSION = 2


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
    tp: int               # official TP rows: on an exact distance tie, one reference can give several
    fp: int
    fn: int               # references no prediction claimed
    found: int = 0        # references with a TP (sensitivity = found / n_ref)


def label_components(binary: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    if connectivity not in CONNECTIVITY_RANK:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    structure = ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])
    return ndimage.label(binary, structure=structure)


def xyz(image: sitk.Image) -> np.ndarray:
    """The image's voxels as an (x, y, z) array, the index order of the official code (a view, no copy)."""
    return sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)


def centres_index(labels_xyz: np.ndarray, n: int, offset=(0, 0, 0)) -> np.ndarray:
    """(n, 3) centres of mass of components 1..n in index units, of labels cut from a larger array at `offset`
    (the centres are the larger array's). Bit for bit `ndimage.center_of_mass` of the whole array with unit
    weights: each component's coordinate sums and voxel count are exact integers, divided once, as scipy's float64
    sums of integer coordinates are; this needs only each component's own box instead of whole-array index grids
    (9 s on a 512x512x192 grid, the slowest part of scoring one)."""
    centres = np.zeros((n, 3))
    for p, box in enumerate(ndimage.find_objects(labels_xyz, n) if n else []):
        if box is None:   # a number no voxel carries: no centre (scipy gives NaN too), so it claims nothing
            centres[p] = np.nan
            continue
        points = np.nonzero(labels_xyz[box] == p + 1)
        count = len(points[0])
        for axis in range(3):
            start = box[axis].start + int(offset[axis])
            centres[p, axis] = float(int(points[axis].sum(dtype=np.int64)) + count * start) / count
    return centres


def centres_mm(labels_xyz: np.ndarray, n: int, spacing, offset=(0, 0, 0)) -> np.ndarray:
    """(n, 3) centres of mass of components 1..n, in index units times the voxel size (x, y, z)."""
    return centres_index(labels_xyz, n, offset) * np.asarray(spacing, float)


def occupied_box(*masks: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of the masks (all of one shape); the first voxel when none is.
    Labelling and measuring inside it gives the whole array's labels and figures: components are numbered by their
    first voxel in raster order, which a box keeps."""
    occupied = np.logical_or.reduce(masks) if len(masks) > 1 else masks[0]
    box = []
    for axis in range(occupied.ndim):
        hit = np.flatnonzero(np.any(occupied, axis=tuple(a for a in range(occupied.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 1))
    return tuple(box)


def nifti_spacing(image: sitk.Image) -> np.ndarray:
    """The voxel size as a NIfTI header stores it (float32), whatever file the image came from."""
    return np.asarray(image.GetSpacing(), np.float32).astype(np.float64)


def voxel_volume_mm3(spacing) -> float:
    """A float32 product, as the official code's np.prod of the header's float32 voxel sizes."""
    return float(np.prod(np.asarray(spacing, np.float32)))


def check_same_grid(reference: sitk.Image, prediction: sitk.Image, subject: str = "") -> None:
    if reference.GetSize() != prediction.GetSize():
        raise CaseError(f"{subject}: prediction size {prediction.GetSize()} != reference size {reference.GetSize()}")
    if not np.allclose(reference.GetSpacing(), prediction.GetSpacing(), rtol=1e-4):
        raise CaseError(f"{subject}: prediction spacing {prediction.GetSpacing()} != reference "
                        f"{reference.GetSpacing()}")


def component_evidence(reference: sitk.Image, prediction: sitk.Image, labels_xyz: np.ndarray | None = None,
                       n: int | None = None, distance_mm: float = 5.0, connectivity: int = 26) -> dict:
    """Per predicted component: voxels, sum of its values, the reference it claims (index in the references'
    label order, or None), the distance to it and the overlap (sum of reference values inside the component);
    per reference: weight (highest value) and sum of values; and the voxel volume.

    `labels_xyz`/`n`: the prediction's components, labelled with `connectivity` on its (x, y, z) array in any
    numbering (a lesion table's ids, say); by default they are labelled here, in the official order. Entries
    follow that numbering. `prediction` holds the values (probabilities, or 0/1); voxels >= 0.5 belong to
    components.
    """
    spacing = nifti_spacing(prediction)  # the official code takes the voxel size from the prediction's header
    # both arrays stay in the files' own types (no float64 copies of whole volumes); sums are taken in float64
    ref_whole = np.around(xyz(reference), 1)   # rounded in the file's own type, as the official code does
    native_whole = np.ascontiguousarray(xyz(prediction))  # the official code copies it in C order: same sum order
    predicted = native_whole >= 0.5
    if labels_xyz is not None and n is None:
        raise ValueError("component_evidence: labels_xyz needs their count n")
    # components are labelled and measured in the box that holds them all (the same labels, centres and sums as
    # on the whole grid, seconds less on a 512x512x192 one); the totals stay whole-array sums, in the official order
    box = occupied_box(ref_whole != 0, predicted if labels_xyz is None else labels_xyz > 0)
    offset = [b.start for b in box]
    ref, native = ref_whole[box], native_whole[box]
    ref_labels, n_ref = label_components(ref != 0, connectivity)
    if labels_xyz is None:
        labels_xyz, n = label_components(predicted[box], connectivity)
    else:
        labels_xyz = labels_xyz[box]
    assert n is not None
    ref_centres = centres_mm(ref_labels, n_ref, spacing, offset)
    pred_centres = centres_mm(labels_xyz, n, spacing, offset)
    index = range(1, n_ref + 1)
    evidence = {
        "version": EVIDENCE_VERSION, "voxel_mm3": voxel_volume_mm3(spacing),
        "ref_weights": [float(v) for v in ndimage.maximum(ref, ref_labels, index)] if n_ref else [],
        "ref_sums": [float(v) for v in ndimage.sum(ref, ref_labels, index)] if n_ref else [],
        # totals summed as the official code sums them (in the images' own types, over the whole arrays), for the
        # volume difference
        "ref_total": float(np.sum(ref_whole)),
        "pred_total": float(np.sum(np.where(predicted, native_whole, np.zeros_like(native_whole)))),
    }
    components: list[dict] = []
    evidence["components"] = components
    distances = cdist(pred_centres, ref_centres) if n and n_ref else np.zeros((n, 0))
    boxes = ndimage.find_objects(labels_xyz, n) if n else []
    for p in range(n):
        inside = labels_xyz[boxes[p]] == p + 1
        component = {"voxels": int(inside.sum()), "value_sum": float(native[boxes[p]][inside].sum(dtype=np.float64)),
                     "claim": None, "distance": None, "overlap": 0.0}
        near = np.flatnonzero(distances[p] < distance_mm)
        if near.size:
            claim = int(near[np.argmin(distances[p, near])])  # argmin: the first of equally near references
            component.update(claim=claim, distance=float(distances[p, claim]),
                             overlap=float(ref[boxes[p]][inside & (ref_labels[boxes[p]] == claim + 1)]
                                           .sum(dtype=np.float64)))
        components.append(component)
    return evidence


def score_components(evidence: dict, keep=None, subject: str = "") -> CaseScore:
    """The official scores of the prediction made of the kept components (keep: one bool each; default all)."""
    components = evidence["components"]
    kept = [c for c, k in zip(components, keep if keep is not None else [True] * len(components)) if k]
    n_ref, n_pred = len(evidence["ref_weights"]), len(kept)
    weights = evidence["ref_weights"]
    claims: dict[int, list[dict]] = {}
    for component in kept:
        if component["claim"] is not None:
            claims.setdefault(component["claim"], []).append(component)
    tp_refs = []  # the reference of every TP row
    for ref, claimed in claims.items():
        nearest = min(c["distance"] for c in claimed)
        tp_refs += [ref for c in claimed if c["distance"] == nearest]
    tp, found = len(tp_refs), len(claims)
    fp, fn = n_pred - tp, n_ref - found
    # the whole prediction: its total as the official code sums it; a subset: the sum of its components' sums
    seg_sum = evidence["pred_total"] if n_pred == len(components) else sum(c["value_sum"] for c in kept)
    if evidence["ref_total"] == 0:
        f1 = dice = math.nan
    elif seg_sum == 0:
        f1 = dice = 0.0
    else:
        weighted_tp = float(np.sum([weights[r] for r in tp_refs]))
        weighted_fn = sum(weights[r] for r in range(n_ref) if r not in claims)
        f1 = (2 * weighted_tp) / (weighted_fn + fp + 2 * weighted_tp)
        dices = [(2.0 * sum(c["overlap"] for c in claims[r]))
                 / (sum(c["voxels"] for c in claims[r]) + evidence["ref_sums"][r]) for r in sorted(claims)]
        dice = float(np.mean(np.asarray(dices))) if dices else 0.0
    volume_diff = abs(float(seg_sum) - float(evidence["ref_total"])) * evidence["voxel_mm3"]
    return CaseScore(subject, "ok", float(dice), volume_diff, float(f1), float(abs(n_ref - n_pred)), n_ref, n_pred,
                     tp, fp, fn, found)


def score_case(reference: sitk.Image, prediction: sitk.Image, subject: str = "", distance_mm: float = 5.0,
               connectivity: int = 26) -> CaseScore:
    """Score one prediction (binary or probability) against a reference on the same grid."""
    check_same_grid(reference, prediction, subject)
    evidence = component_evidence(reference, prediction, distance_mm=distance_mm, connectivity=connectivity)
    return score_components(evidence, subject=subject)


def reference_count(reference: sitk.Image, connectivity: int = 26) -> int:
    return label_components(np.around(xyz(reference), 1) != 0, connectivity)[1]


def missing_score(subject: str, n_ref: int, status: str = "missing") -> CaseScore:
    """Worst values for a case without a usable prediction (every reference lesion is missed)."""
    return CaseScore(subject, status, WORST["dice"], WORST["volume_diff"], WORST["f1"], WORST["count_diff"],
                     n_ref, 0, 0, 0, n_ref, 0)


def pooled(scores: list[CaseScore]) -> dict:
    """Detection figures over all cases together; NaN where undefined (no reference lesion, no detection)."""
    tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
    found, n_ref = sum(s.found for s in scores), sum(s.n_ref for s in scores)
    return {
        "tp": tp, "fp": fp, "fn": fn, "found": found, "n_ref": n_ref,
        "sensitivity": found / n_ref if n_ref else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "fp_per_scan": fp / len(scores) if scores else math.nan,
    }


def summarize(scores: list[CaseScore]) -> dict:
    """Median and IQR (25th, 75th percentile, linear as pandas' quantile) per metric over cases with a defined
    value, and the pooled detection figures."""
    summary: dict = {"cases": len(scores)}
    for metric in METRICS:
        values = np.array([getattr(s, metric) for s in scores], float)
        finite = values[~np.isnan(values)]
        if finite.size:
            q1, med, q3 = np.percentile(finite, [25, 50, 75])
            summary[metric] = {"median": float(med), "q1": float(q1), "q3": float(q3), "n": int(finite.size)}
        else:
            summary[metric] = {"median": math.nan, "q1": math.nan, "q3": math.nan, "n": 0}
    summary["pooled"] = pooled(scores)
    return summary

