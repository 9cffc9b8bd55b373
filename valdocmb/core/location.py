"""Where each microbleed is: the scan registered to MNI space, each lesion given an atlas region, a MARS class
(lobar, deep, infratentorial) and a side, and the per-scan counts a MARS or Boston v2.0 reader needs.

Registration (SimpleITK): the skull-stripped T1 template (2 mm, shipped in core/data) is aligned to the scan by a
12-parameter affine transform maximising Mattes mutual information (T2* and T1 contrasts differ, their shared
information does not), started from the brains' centres of mass, on two resolution levels of the scan resampled to
2 mm. Mutual information on a 2 mm grid works the same for thick slices and any voxel orientation: everything
happens in physical (LPS) space. The result is checked before it is used: the template's brain carried onto the
scan must overlap the scan's brain (Dice >= MIN_BRAIN_OVERLAP) and the transform's scales must stay within
SCALE_RANGE; otherwise every region is reported as unknown, with the reason.

The atlas (core/data/mni_regions.nii.gz, labels in mni_regions.json) is FreeSurfer's Desikan-Killiany
parcellation of its cvs_avg35_inMNI152 subject grouped into MARS regions by `python -m valdocmb.synth.atlas` (see
that module for the rules). A lesion whose centre maps outside the atlas's tissue (a ventricle, a sulcus) takes the
nearest labelled voxel within NEAREST_MM.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .imageio import image_like

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
MARS_CLASSES = ("lobar", "deep", "infratentorial")
MIN_BRAIN_OVERLAP = 0.8
SCALE_RANGE = (0.7, 1.4)
NEAREST_MM = 6.0
WORK_SPACING_MM = 2.0
UNKNOWN = "unknown"


@dataclass
class Atlas:
    template: sitk.Image       # skull-stripped T1, 2 mm
    labels: sitk.Image         # region labels, 1 mm
    label_array: np.ndarray    # (z, y, x)
    names: dict                # label -> {"region", "mars_class", "side"}


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    labels = sitk.ReadImage(str(DATA / "mni_regions.nii.gz"))
    names = {int(k): v for k, v in json.loads((DATA / "mni_regions.json").read_text())["labels"].items()}
    template = sitk.ReadImage(str(DATA / "mni_t1_brain_2mm.nii.gz"), sitk.sitkFloat32)
    return Atlas(template, labels, sitk.GetArrayFromImage(labels), names)


@dataclass
class Placement:
    """The scan's registration to MNI space: `transform` maps scan points (LPS mm) to MNI points, or is None with
    `problem` saying why the regions are unknown."""

    transform: sitk.Transform | None
    brain_overlap: float | None
    seconds: float
    problem: str | None = None

    def record(self) -> dict:
        return {"status": "ok" if self.problem is None else f"{UNKNOWN}: {self.problem}",
                "brain_overlap": None if self.brain_overlap is None else round(self.brain_overlap, 3),
                "seconds": round(self.seconds, 2)}


def _on_work_grid(scan: sitk.Image) -> sitk.Image:
    """The scan smoothed and resampled to WORK_SPACING_MM in its own orientation (NaN -> 0)."""
    image = sitk.Cast(scan, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        clean = sitk.GetImageFromArray(np.nan_to_num(sitk.GetArrayFromImage(image), nan=0.0, posinf=0.0, neginf=0.0))
        clean.CopyInformation(image)
        image = clean
    spacing = np.array(image.GetSpacing())
    sigma = [max(0.0, (WORK_SPACING_MM - s) / 2.355) for s in spacing]  # FWHM of the coarser grid
    if any(sigma):
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigma])
    size = [max(1, int(round(n * s / WORK_SPACING_MM))) for n, s in zip(scan.GetSize(), spacing)]
    origin = scan.TransformContinuousIndexToPhysicalPoint([(WORK_SPACING_MM / s - 1) / 2 for s in spacing])
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, [WORK_SPACING_MM] * 3,
                         scan.GetDirection(), 0.0, sitk.sitkFloat32)


def _brain_on(scan: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """The scan's non-zero voxels (the skull-stripped brain) as a mask on `grid`."""
    nonzero = sitk.Cast(sitk.Cast(scan, sitk.sitkFloat32) != 0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(nonzero, grid, sitk.Transform(), sitk.sitkLinear, 0.0)) > 0.5


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 0.0


def register(scan: sitk.Image) -> Placement:
    """The scan's placement in MNI space (see the module's description); never raises for a bad registration."""
    start = time.perf_counter()
    atlas = load_atlas()
    fixed = _on_work_grid(scan)
    fixed_brain = _brain_on(scan, fixed)
    if fixed_brain.sum() < 1000:  # under 8 ml at 2 mm
        return Placement(None, None, time.perf_counter() - start, "the scan holds too little non-zero signal")
    moving = atlas.template
    brain_image = image_like(fixed_brain.astype(np.uint8), fixed)
    try:
        initial = sitk.CenteredTransformInitializer(sitk.Cast(brain_image, sitk.sitkFloat32),
                                                    sitk.Cast(moving > 0, sitk.sitkFloat32), sitk.AffineTransform(3),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.25, seed=1)
        method.SetMetricFixedMask(sitk.BinaryDilate(brain_image, [2] * 3))
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=150,
                                                        gradientMagnitudeTolerance=1e-6)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([2.0, 0.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(initial, inPlace=True)
        method.Execute(fixed, moving)
        transform = initial
    except RuntimeError as exc:  # ITK stops with an exception when, e.g., no sample falls inside both images
        return Placement(None, None, time.perf_counter() - start, f"registration failed ({str(exc).strip()[-160:]})")
    carried = sitk.Resample(sitk.Cast(moving > 0, sitk.sitkFloat32), fixed, transform, sitk.sitkLinear, 0.0)
    overlap = _dice(sitk.GetArrayViewFromImage(carried) > 0.5, fixed_brain)
    scales = np.linalg.svd(np.array(transform.GetMatrix()).reshape(3, 3), compute_uv=False)
    seconds = time.perf_counter() - start
    if overlap < MIN_BRAIN_OVERLAP:
        return Placement(None, overlap, seconds, f"registration implausible: brain overlap {overlap:.2f} < "
                                                 f"{MIN_BRAIN_OVERLAP}")
    if scales.min() < SCALE_RANGE[0] or scales.max() > SCALE_RANGE[1]:
        return Placement(None, overlap, seconds, "registration implausible: scaling "
                                                 f"{scales.min():.2f}-{scales.max():.2f} outside {SCALE_RANGE}")
    return Placement(transform, overlap, seconds)


def region_at(mni_point, atlas: Atlas | None = None) -> dict:
    """{"region", "mars_class", "side"} of the atlas at an MNI point (LPS mm); the nearest labelled voxel within
    NEAREST_MM when the point itself is unlabelled; unknown beyond."""
    atlas = atlas or load_atlas()
    index = np.array(atlas.labels.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in mni_point)))
    centre = np.round(index).astype(int)[::-1]  # (z, y, x)
    reach = int(np.ceil(NEAREST_MM / min(atlas.labels.GetSpacing())))
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, atlas.label_array.shape)
    if np.any(hi <= lo):
        return {"region": UNKNOWN, "mars_class": UNKNOWN, "side": UNKNOWN}
    block = atlas.label_array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    found = np.argwhere(block > 0)
    if not len(found):
        return {"region": UNKNOWN, "mars_class": UNKNOWN, "side": UNKNOWN}
    spacing = np.array(atlas.labels.GetSpacing())[::-1]
    distances = np.linalg.norm((found + lo - centre) * spacing, axis=1)
    nearest = int(np.argmin(distances))
    if distances[nearest] > NEAREST_MM:
        return {"region": UNKNOWN, "mars_class": UNKNOWN, "side": UNKNOWN}
    return dict(atlas.names[int(block[tuple(found[nearest])])])


def locate(lesions, placement: Placement) -> list[dict]:
    """Each lesion's {"region", "mars_class", "side"} (unknown for all when the placement failed)."""
    if placement.transform is None:
        return [{"region": UNKNOWN, "mars_class": UNKNOWN, "side": UNKNOWN} for _ in lesions]
    atlas = load_atlas()
    return [region_at(placement.transform.TransformPoint((lesion.world_x_mm, lesion.world_y_mm, lesion.world_z_mm)),
                      atlas) for lesion in lesions]


def census(places: list[dict], status: str) -> dict:
    """Per-scan counts from the lesions' places: per MARS class, brainstem and cerebellum apart, and
    `strictly_lobar` as Boston v2.0 reads it (lobar microbleeds and none in deep regions or the brainstem;
    cerebellar ones allowed): "yes", "no", or "" when the regions are unknown. `status`: "ok", or why unknown."""
    counts = {f"n_{c}": sum(p["mars_class"] == c for p in places) for c in MARS_CLASSES}
    counts["n_brainstem"] = sum(p["region"] == "brainstem" for p in places)
    counts["n_cerebellum"] = sum(p["region"] == "cerebellum" for p in places)
    counts["n_location_unknown"] = sum(p["mars_class"] == UNKNOWN for p in places)
    if status != "ok":
        strictly = ""
    else:
        strictly = "yes" if counts["n_lobar"] and not (counts["n_deep"] or counts["n_brainstem"]) else "no"
    return {**counts, "strictly_lobar": strictly, "location": status}


CENSUS_FIELDS = ("n_lobar", "n_deep", "n_infratentorial", "n_brainstem", "n_cerebellum", "n_location_unknown",
                 "strictly_lobar", "location")
