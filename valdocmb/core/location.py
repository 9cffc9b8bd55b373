"""Where each microbleed is: the scan registered to MNI space, each lesion given an atlas region, a MARS class
(lobar, deep, infratentorial) and a side, and the per-scan counts a MARS or Boston v2.0 reader needs.

Registration (SimpleITK), in physical (LPS) space, so that thick slices and any voxel order are the same problem:
the skull-stripped T1 template (2 mm, shipped in core/data) is aligned to the scan resampled to 2 mm, maximising
Mattes mutual information (T2* and T1 contrasts differ, their shared information does not).
1. Orientation search: a rigid fit with one scale on a 6 mm grid from each of the 24 axis-aligned orientations
   (every way a head can lie along the scanner axes, whatever the header claims), centred on the brains'
   centroids; the best metric wins. A header that misstates the orientation (turned, upside down, on its side)
   is thereby found, not trusted.
2. Refinement: the same fit, then a 12-parameter affine fit, on two levels (4 and 2 mm).
3. Plausibility (`implausible`, `doubtful`), thresholds chosen on measured correct and wrong registrations (see
   `valdocmb.bench.location --candidates`): the template's brain carried onto the scan must overlap the scan's
   brain (or, a little less, with high mutual information), the scan carried into MNI space must be left-right
   symmetric, the transform's scales must be those of a head; otherwise every region is `unknown` with the reason.
   A usable placement with a measure near its limit is `marginal`: regions are given, and flagged.

The atlas (core/data/mni_regions.nii.gz, labels in mni_regions.json) is FreeSurfer's Desikan-Killiany
parcellation of its cvs_avg35_inMNI152 subject grouped into MARS regions by `python -m valdocmb.synth.atlas` (see
that module for the rules). A lesion whose centre maps outside the atlas's tissue (a ventricle, a sulcus) takes the
nearest labelled voxel within NEAREST_MM.
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .imageio import image_like

log = logging.getLogger(__name__)

DATA = Path(str(importlib.resources.files(__package__) / "data"))  # package data, also in a wheel install
MARS_CLASSES = ("lobar", "deep", "infratentorial")
# plausibility (see `implausible` and `doubtful` for how they were chosen)
MIN_BRAIN_OVERLAP = 0.80
MIN_INFORMATION = 0.35         # Mattes mutual information (ITK's metric is its negative)
MIN_SYMMETRY = 0.30
SCALE_RANGE = (0.7, 1.4)
MAX_ANISOTROPY = 1.5
MARGINAL_BRAIN_OVERLAP = 0.94
MARGINAL_SYMMETRY = 0.40
MARGINAL_INFORMATION = 0.40
MARGINAL_ANISOTROPY = 1.35
NEAREST_MM = 6.0
WORK_SPACING_MM = 2.0
UNKNOWN = "unknown"
MARGINAL = "marginal"
SEARCH_SHRINK = 3              # the orientation search runs on the work grid shrunk to 6 mm
SEARCH_SMOOTHING_MM = 2.0
SEARCH_ITERATIONS = 40
SEARCH_STEP_MM = 4.0           # a 20-degree tilt moves the cortex by ~25 mm: 1 mm steps do not get there in time
REFINED_ORIENTATIONS = 1       # how many of the best orientations of the search the full affine fit refines


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
    `problem` saying why the regions are unknown. `marginal` says why a placement that is used is in doubt;
    `quality` holds the measures the verdict was drawn from."""

    transform: sitk.Transform | None
    seconds: float
    problem: str | None = None
    quality: dict = field(default_factory=dict)
    marginal: str | None = None
    refused: sitk.Transform | None = None  # the registration that `problem` refused, for benchmarks

    @property
    def brain_overlap(self) -> float | None:
        return self.quality.get("brain_overlap")

    @property
    def status(self) -> str:
        if self.problem is not None:
            return f"{UNKNOWN}: {self.problem}"
        return f"{MARGINAL}: {self.marginal}" if self.marginal else "ok"

    def record(self) -> dict:
        rounded = {k: (None if v is None else np.round(v, 3).tolist()) for k, v in self.quality.items()}
        return {"status": self.status, "brain_overlap": None, **rounded, "seconds": round(self.seconds, 2)}


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


def _proper_rotations() -> list[np.ndarray]:
    """The 24 rotations that map the coordinate axes onto each other (signed permutations with determinant +1)."""
    rotations = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), order] = signs
            if np.linalg.det(matrix) > 0:
                rotations.append(matrix)
    return rotations


ORIENTATIONS = _proper_rotations()


def _centroid(mask: np.ndarray, grid: sitk.Image) -> np.ndarray:
    return np.array(grid.TransformContinuousIndexToPhysicalPoint(np.argwhere(mask).mean(0)[::-1].tolist()))


def _registration(fixed_mask: sitk.Image, levels: list[tuple[int, float]], iterations: int,
                  step_mm: float = 1.0) -> sitk.ImageRegistrationMethod:
    """Mattes mutual information inside the (dilated) scan brain, gradient descent over `levels` of
    (shrink factor, smoothing sigma in mm), first steps of about `step_mm` (halved whenever the direction turns)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed=1)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=step_mm, minStep=1e-3, numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([shrink for shrink, _ in levels])
    method.SetSmoothingSigmasPerLevel([sigma for _, sigma in levels])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _as_affine(transform: sitk.Transform, centre: np.ndarray) -> sitk.AffineTransform:
    """An affine transform (or a composite of them) as one AffineTransform about `centre`."""
    origin = np.array(transform.TransformPoint(centre.tolist()))
    matrix = np.stack([np.array(transform.TransformPoint((centre + axis).tolist())) - origin for axis in np.eye(3)], 1)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation((origin - centre).tolist())
    return affine


def _fit_similarity(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, start: sitk.AffineTransform,
                    levels: list[tuple[int, float]], iterations: int,
                    step_mm: float = 1.0) -> tuple[float, sitk.AffineTransform]:
    """Rotation, one scale and shift fitted on top of `start` (which stays fixed: ITK's versor parameters cannot
    start from a half turn, so the optimised part starts from the identity); (metric, the whole as one affine)."""
    centre = np.array(start.GetCenter())
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(centre.tolist())
    method = _registration(fixed_mask, levels, iterations, step_mm)
    method.SetMovingInitialTransform(start)  # applied after the optimised similarity
    method.SetInitialTransform(similarity, inPlace=True)
    method.Execute(fixed, moving)
    return method.GetMetricValue(), _as_affine(sitk.CompositeTransform([start, similarity]), centre)


def _search_orientations(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, scan_centre: np.ndarray,
                         template_centre: np.ndarray) -> list[tuple[float, sitk.AffineTransform]]:
    """A rigid fit (with one scale) on a coarse grid from each of the 24 axis-aligned orientations, centred on the
    brains' centroids; (metric, transform) pairs, best (lowest metric) first."""
    fits = []
    for rotation in ORIENTATIONS:
        start = sitk.AffineTransform(3)
        start.SetCenter(scan_centre.tolist())
        start.SetMatrix(rotation.ravel().tolist())
        start.SetTranslation((template_centre - scan_centre).tolist())
        try:
            fits.append(_fit_similarity(fixed, moving, fixed_mask, start, [(SEARCH_SHRINK, SEARCH_SMOOTHING_MM)],
                                        SEARCH_ITERATIONS, SEARCH_STEP_MM))
        except RuntimeError:  # e.g. no sample inside both images from this start
            continue
    return sorted(fits, key=lambda fit: fit[0])


def _rotation_between(a: np.ndarray, b: np.ndarray) -> float:
    """Degrees of rotation between the orthogonal parts of two linear maps."""
    u1, _, v1 = np.linalg.svd(a)
    u2, _, v2 = np.linalg.svd(b)
    relative = (u1 @ v1) @ (u2 @ v2).T
    return float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))


def _symmetry(scan_work: sitk.Image, transform: sitk.AffineTransform, template: sitk.Image) -> float:
    """Correlation of the scan, carried into MNI space, with its own left-right mirror inside the template brain:
    a brain placed upright and facing forward is nearly symmetric about MNI x = 0."""
    to_scan = transform.GetInverse()
    mirror = sitk.AffineTransform(3)
    mirror.SetMatrix((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    mirrored_to_scan = sitk.CompositeTransform([to_scan, mirror])  # applied last to first: mirror, then to scan
    carried = sitk.GetArrayFromImage(sitk.Resample(scan_work, template, to_scan, sitk.sitkLinear, 0.0))
    mirrored = sitk.GetArrayFromImage(sitk.Resample(scan_work, template, mirrored_to_scan, sitk.sitkLinear, 0.0))
    inside = (sitk.GetArrayViewFromImage(template) > 0) & (carried > 0) & (mirrored > 0)
    if inside.sum() < 100:
        return 0.0
    return float(np.corrcoef(carried[inside], mirrored[inside])[0, 1])


@dataclass
class Candidate:
    transform: sitk.AffineTransform
    quality: dict


def candidates(scan: sitk.Image, refine: int = REFINED_ORIENTATIONS) -> tuple[list[Candidate], str | None]:
    """The `refine` best orientations of the search, each refined by the full affine fit and measured
    (`quality`), best metric first; or no candidate and the reason."""
    atlas = load_atlas()
    fixed = _on_work_grid(scan)
    fixed_brain = _brain_on(scan, fixed)
    if fixed_brain.sum() < 1000:  # under 8 ml at 2 mm
        return [], "the scan holds too little non-zero signal"
    moving = atlas.template
    fixed_mask = sitk.BinaryDilate(image_like(fixed_brain.astype(np.uint8), fixed), [2] * 3)
    scan_centre = _centroid(fixed_brain, fixed)
    template_centre = _centroid(sitk.GetArrayViewFromImage(moving) > 0, moving)
    fits = _search_orientations(fixed, moving, fixed_mask, scan_centre, template_centre)
    found = []
    for _, searched in fits[:refine]:
        # rotation, one scale and shift first (the coarse search leaves tilts of 20 degrees half done), then the
        # full affine fit
        try:
            _, transform = _fit_similarity(fixed, moving, fixed_mask, searched, [(2, 2.0), (1, 0.0)], 150)
            method = _registration(fixed_mask, [(2, 2.0), (1, 0.0)], 150)
            method.SetInitialTransform(transform, inPlace=True)
            method.Execute(fixed, moving)
        except RuntimeError:  # ITK stops with an exception when, e.g., no sample falls inside both images
            continue
        matrix = np.array(transform.GetMatrix()).reshape(3, 3)
        others = [m for m, t in fits if _rotation_between(np.array(t.GetMatrix()).reshape(3, 3), matrix) > 45]
        carried = sitk.Resample(sitk.Cast(moving > 0, sitk.sitkFloat32), fixed, transform, sitk.sitkLinear, 0.0)
        scales = np.linalg.svd(matrix, compute_uv=False)
        found.append(Candidate(transform, {
            "metric": method.GetMetricValue(),  # same grid and samples for every candidate: comparable
            "brain_overlap": _dice(sitk.GetArrayViewFromImage(carried) > 0.5, fixed_brain),
            "search_margin": (min(others) - fits[0][0]) if others else None,
            "symmetry": _symmetry(fixed, transform, moving),
            "scale_min": float(scales.min()), "scale_max": float(scales.max()),
            "anisotropy": float(scales.max() / scales.min()),
        }))
    if not found:
        return [], "registration failed from every orientation"
    return sorted(found, key=lambda candidate: candidate.quality["metric"]), None


def implausible(quality: dict) -> str | None:
    """Why a registration must not be used, or None. Chosen on 330 measured registrations (bench.location
    --candidates on a calibration set, and two development sets): every wrong one had mutual information <= 0.32
    and brain overlap <= 0.914, correct ones mutual information >= 0.32 and overlap down to 0.835 on anatomies the
    template fits less well, so a low overlap is refused only when the mutual information is low too."""
    overlap, information = quality["brain_overlap"], -quality["metric"]
    if overlap < MIN_BRAIN_OVERLAP:
        return f"registration implausible: brain overlap {overlap:.2f} < {MIN_BRAIN_OVERLAP}"
    if information < MIN_INFORMATION and overlap < MARGINAL_BRAIN_OVERLAP:
        return (f"registration implausible: brain overlap {overlap:.2f} < {MARGINAL_BRAIN_OVERLAP} with mutual "
                f"information {information:.2f} < {MIN_INFORMATION}")
    if quality["symmetry"] < MIN_SYMMETRY:
        return (f"registration implausible: the brain placed in MNI space is not left-right symmetric "
                f"({quality['symmetry']:.2f} < {MIN_SYMMETRY})")
    if quality["scale_min"] < SCALE_RANGE[0] or quality["scale_max"] > SCALE_RANGE[1]:
        return (f"registration implausible: scaling {quality['scale_min']:.2f}-{quality['scale_max']:.2f} outside "
                f"{SCALE_RANGE}")
    if quality["anisotropy"] > MAX_ANISOTROPY:
        return f"registration implausible: anisotropy {quality['anisotropy']:.2f} > {MAX_ANISOTROPY}"
    return None


def doubtful(quality: dict) -> str | None:
    """Why a usable registration is in doubt (reported as marginal, regions given), or None: a measure between the
    refusal threshold and the range of the correct registrations measured."""
    reasons = []
    if quality["brain_overlap"] < MARGINAL_BRAIN_OVERLAP:
        reasons.append(f"brain overlap {quality['brain_overlap']:.3f} < {MARGINAL_BRAIN_OVERLAP}")
    if quality["symmetry"] < MARGINAL_SYMMETRY:
        reasons.append(f"symmetry {quality['symmetry']:.2f} < {MARGINAL_SYMMETRY}")
    if -quality["metric"] < MARGINAL_INFORMATION:
        reasons.append(f"mutual information {-quality['metric']:.2f} < {MARGINAL_INFORMATION}")
    if quality["anisotropy"] > MARGINAL_ANISOTROPY:
        reasons.append(f"anisotropy {quality['anisotropy']:.2f} > {MARGINAL_ANISOTROPY}")
    return ", ".join(reasons) or None


def register(scan: sitk.Image) -> Placement:
    """The scan's placement in MNI space (see the module's description); never raises for a bad registration."""
    start = time.perf_counter()
    found, problem = candidates(scan)
    if not found:
        return Placement(None, time.perf_counter() - start, problem)
    best = found[0]
    seconds = time.perf_counter() - start
    problem = implausible(best.quality)
    if problem:
        return Placement(None, seconds, problem, best.quality, refused=best.transform)
    return Placement(best.transform, seconds, None, best.quality,
                     doubtful(best.quality))


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


def placed(status: str) -> bool:
    """Whether a placement status ("ok", "marginal: why", "unknown: why") gives regions."""
    return status == "ok" or status.startswith(MARGINAL)


def census(places: list[dict], status: str) -> dict:
    """Per-scan counts from the lesions' places: per MARS class, brainstem and cerebellum apart, and
    `strictly_lobar` as Boston v2.0 reads it (lobar microbleeds and none in deep regions or the brainstem;
    cerebellar ones allowed): "yes", "no", or "" when the regions are unknown. `status`: Placement.status."""
    counts = {f"n_{c}": sum(p["mars_class"] == c for p in places) for c in MARS_CLASSES}
    counts["n_brainstem"] = sum(p["region"] == "brainstem" for p in places)
    counts["n_cerebellum"] = sum(p["region"] == "cerebellum" for p in places)
    counts["n_location_unknown"] = sum(p["mars_class"] == UNKNOWN for p in places)
    if not placed(status):
        strictly = ""
    else:
        strictly = "yes" if counts["n_lobar"] and not (counts["n_deep"] or counts["n_brainstem"]) else "no"
    return {**counts, "strictly_lobar": strictly, "location": status}


CENSUS_FIELDS = ("n_lobar", "n_deep", "n_infratentorial", "n_brainstem", "n_cerebellum", "n_location_unknown",
                 "strictly_lobar", "location")
