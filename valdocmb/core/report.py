"""What a researcher gets back besides the mask: per-lesion tables, a labelled mask, a batch summary, run.json.

Lesions are the connected components (26-neighbourhood) of the final mask on the input grid, numbered 1..n in
order of decreasing maximum probability (then volume), the same numbers as in the labelled mask and the QC pictures.
Screening and discrimination scores come from the confirmed candidates whose centre falls inside (or within 2 mm of)
the lesion.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import __version__
from .location import CENSUS_FIELDS
from .result import SegmentationResult

LESION_FIELDS = ("id", "voxel_x", "voxel_y", "voxel_z", "world_x_mm", "world_y_mm", "world_z_mm", "volume_mm3",
                 "volume_voxels", "max_probability", "mean_probability", "screening_score", "discrimination_score",
                 "region", "mars_class", "side")
SUMMARY_FIELDS = ("case", "input", "mask", "status", "error", "cmb_count", "total_volume_mm3", *CENSUS_FIELDS,
                  "method", "weights", "seconds")


@dataclass
class Lesion:
    id: int
    voxel_x: float
    voxel_y: float
    voxel_z: float
    world_x_mm: float
    world_y_mm: float
    world_z_mm: float
    volume_mm3: float
    volume_voxels: int
    max_probability: float
    mean_probability: float
    screening_score: float | None
    discrimination_score: float | None
    region: str = ""              # atlas region, MARS class and side (core.location); "" when not located
    mars_class: str = ""
    side: str = ""


def lesion_table(result: SegmentationResult, match_mm: float = 2.0) -> tuple[np.ndarray, list[Lesion]]:
    """(labelled (z, y, x) uint16 array, lesions) from a segmentation result.

    Components are labelled in the box around the mask and measured over their own voxels only: a 512x512x192
    scan holds 50 million voxels and its microbleeds a few hundred (scipy's whole-volume `maximum` sorts them all).
    """
    mask = sitk.GetArrayFromImage(result.mask) > 0
    full_labels = np.zeros(mask.shape, np.uint16)
    if not mask.any():
        return full_labels, []
    box = tuple(slice(int(np.flatnonzero(mask.any(axis=other)).min()),
                      int(np.flatnonzero(mask.any(axis=other)).max()) + 1)
                for other in ((1, 2), (0, 2), (0, 1)))
    labels, n = ndimage.label(mask[box], np.ones((3, 3, 3)))
    inside = labels > 0
    owner = labels[inside]                                     # each mask voxel's component
    probability = (sitk.GetArrayViewFromImage(result.probability)[box][inside].astype(np.float64)
                   if result.probability is not None else np.ones(len(owner)))
    counts = np.bincount(owner, minlength=n + 1)[1:]
    maxima = np.full(n + 1, -np.inf)
    np.maximum.at(maxima, owner, probability)
    maxima = maxima[1:]
    means = np.bincount(owner, probability, minlength=n + 1)[1:] / counts
    offset = np.array([s.start for s in box])
    coords = np.argwhere(inside) + offset                      # the same order as `owner` (C order)
    centres = [tuple(c) for c in np.stack([np.bincount(owner, coords[:, axis], minlength=n + 1)[1:] / counts
                                           for axis in range(3)], axis=1)]
    image = result.mask
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    full_labels[box] = labels                                  # the detections' lookup needs the whole grid
    scores = _candidate_scores(result.detections, full_labels, image, centres, match_mm)

    order = sorted(range(n), key=lambda i: (-maxima[i], -counts[i]))
    renumbered = np.zeros(n + 1, np.uint16)
    lesions = []
    for new_id, old in enumerate(order, 1):
        renumbered[old + 1] = new_id
        z, y, x = centres[old]
        world = image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        screening, discrimination = scores.get(old + 1, (None, None))
        lesions.append(Lesion(new_id, round(x, 2), round(y, 2), round(z, 2), round(world[0], 2), round(world[1], 2),
                              round(world[2], 2),
                              round(counts[old] * voxel_mm3, 3), int(counts[old]), round(float(maxima[old]), 4),
                              round(float(means[old]), 4), screening, discrimination))
    full_labels[box] = renumbered[labels]
    return full_labels, lesions


def _candidate_scores(detections, labels, image, centres, match_mm):
    """Stage scores for each labelled lesion, from the detections (candidates) that produced it.

    The best scores of the detections lying inside the lesion; for a lesion with none inside, those of the nearest
    detection whose reach (a detection's `reach_mm`: how far from its centre its segmentation patch extends; else
    match_mm) covers the lesion's centre. A lesion no detection reaches has no scores.
    """
    scores: dict[int, tuple] = {}
    if not detections:
        return scores
    centres_world = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c[::-1]))
                              for c in centres])
    positions = np.array([det["world_mm"] for det in detections], float)
    reach = np.array([det.get("reach_mm", match_mm) for det in detections], float)
    for det in detections:
        index = image.TransformPhysicalPointToIndex(det["world_mm"])
        inside = all(0 <= i < s for i, s in zip(index, image.GetSize()))
        lesion = int(labels[index[2], index[1], index[0]]) if inside else 0
        if lesion:
            best = scores.get(lesion, (-1.0, -1.0))
            scores[lesion] = (round(max(best[0], det["screening_score"]), 4),
                              round(max(best[1], det["discrimination_score"]), 4))
    for lesion, centre in enumerate(centres_world, 1):
        if lesion in scores:
            continue
        distances = np.linalg.norm(positions - centre, axis=1)
        distances[distances > reach] = np.inf
        nearest = int(np.argmin(distances))
        if np.isfinite(distances[nearest]):
            det = detections[nearest]
            scores[lesion] = (round(det["screening_score"], 4), round(det["discrimination_score"], 4))
    return scores


def lesions_csv(lesions: list[Lesion]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LESION_FIELDS, lineterminator="\n")
    writer.writeheader()
    for lesion in lesions:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(lesion).items()})
    return buffer.getvalue()


def lesions_json(lesions: list[Lesion], case_id: str, census: dict | None = None) -> str:
    """The lesion list; with `census` (core.location), the per-scan regional counts too."""
    content = {"case": case_id, "cmb_count": len(lesions), **({"regions": census} if census else {}),
               "lesions": [asdict(lesion) for lesion in lesions]}
    return json.dumps(content, indent=1)


def summary_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(args, method_info: dict, cases: list[dict], started: str, seconds: float) -> dict:
    """Everything needed to trace a result: versions, parameters, device, per-case stage timings."""
    import torch

    from .device import nvidia_driver

    return {
        "valdocmb": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "nvidia_driver": nvidia_driver(),
        "simpleitk": sitk.Version_VersionString(), "numpy": np.__version__, "openvino": _version("openvino"),
        "platform": platform.platform(),
        "started": started, "seconds": round(seconds, 2),
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": method_info, "cases": cases,
    }
