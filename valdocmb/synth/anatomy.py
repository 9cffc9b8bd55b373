"""Subject anatomy: the MNI152 2009a templates shipped in the nilearn wheel, deformed per case.

Tissue maps: GM and WM from the templates (GM includes the deep grey nuclei), brain = skull-stripped T1 > 0,
CSF = clip(brain - GM - WM). Per case, a subject-to-MNI transform: global anisotropic scaling, a small rotation and
translation, and a smooth random B-spline displacement. Also defined in MNI space and deformed with the tissue:
- iron-rich deep nuclei (pallidum, putamen, dentate) as smooth ellipsoids, for the basal-ganglia iron mimic;
- CMB location regions (lobar cortex/juxtacortical, deep grey, brainstem, cerebellum);
- air spaces (frontal and sphenoid sinuses, mastoid cells) whose susceptibility field is computed through the dipole
  kernel on a 2 mm grid, for the air-tissue artefacts at the skull base (B0 along MNI z: rotations are small).
Ellipsoid centres are approximate MNI coordinates (RAS, mm).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.imageio import image_like
from .physics import field_shift_ppm

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
BRAIN_CENTRE_RAS = (0.0, -18.0, 10.0)

# Region labels (for placing microbleeds) on the deformed grid.
LOBAR, DEEP, BRAINSTEM, CEREBELLUM = 1, 2, 3, 4
REGION_NAMES = {LOBAR: "lobar", DEEP: "deep", BRAINSTEM: "brainstem", CEREBELLUM: "cerebellum"}

# (centre RAS mm, radii mm), mirrored for both hemispheres.
IRON_NUCLEI = {
    "pallidum": ((19.0, -4.0, -1.0), (5.0, 8.0, 5.0)),
    "putamen": ((26.0, 2.0, 1.0), (6.0, 13.0, 8.0)),
    "dentate": ((14.0, -57.0, -34.0), (7.0, 6.0, 5.0)),
}
DEEP_GREY = {
    "thalamus": ((11.0, -18.0, 7.0), (8.0, 12.0, 8.0)),
    "caudate": ((13.0, 12.0, 10.0), (5.0, 9.0, 8.0)),
    **IRON_NUCLEI,
}
AIR_SPACES = {
    "frontal_sinus": ((0.0, 64.0, 8.0), (14.0, 7.0, 10.0)),
    "sphenoid_sinus": ((0.0, 12.0, -30.0), (12.0, 10.0, 9.0)),
    "mastoid": ((46.0, -30.0, -42.0), (9.0, 11.0, 8.0)),
    "ethmoid": ((0.0, 40.0, -34.0), (10.0, 12.0, 7.0)),
}
CHI_AIR_MINUS_TISSUE_PPM = 9.4


def template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")  # locate the wheel's data without importing nilearn
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed: its wheel ships the MNI152 templates the simulator needs")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _ras_to_lps(point):
    return (-point[0], -point[1], point[2])


def _ellipsoids(reference: sitk.Image, shapes: dict, mirror: bool = True, softness_mm: float = 1.5) -> np.ndarray:
    """Soft (0..1) union of ellipsoids given in MNI RAS mm, on the reference grid."""
    ras = _world_ras(reference)
    out = np.zeros(ras[0].shape, np.float32)
    for centre, radii in shapes.values():
        for sign in ((1, -1) if mirror and centre[0] != 0 else (1,)):
            c = (sign * centre[0], centre[1], centre[2])
            r = np.sqrt(sum(((ras[i] - c[i]) / radii[i]) ** 2 for i in range(3)))
            out = np.maximum(out, np.clip((1.0 - r) * min(radii) / softness_mm + 0.5, 0, 1))
    return out


@dataclass
class Template:
    """MNI-space maps stacked as channels of one vector image, so one resampling deforms them all."""

    channels: sitk.Image          # gm, wm, brain, iron, air_field_ppm (float32)
    regions: sitk.Image           # uint8 region labels


CHANNELS = ("gm", "wm", "brain", "iron", "air_field_ppm")


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    folder = template_dir()
    read = lambda name: sitk.ReadImage(str(folder / TEMPLATE.format(name)), sitk.sitkFloat32)  # noqa: E731
    t1, gm, wm = read("t1"), read("gm"), read("wm")
    gm_a, wm_a = sitk.GetArrayFromImage(gm) / 255.0, sitk.GetArrayFromImage(wm) / 255.0
    brain_a = ndimage.binary_fill_holes(sitk.GetArrayFromImage(t1) > 0).astype(np.float32)
    # Air spaces hold no tissue: where an ellipsoid reaches into the template's brain, cut it out.
    brain_a *= _ellipsoids(t1, AIR_SPACES) < 0.5
    gm_a, wm_a = gm_a * brain_a, wm_a * brain_a

    iron_a = _ellipsoids(t1, IRON_NUCLEI) * gm_a.clip(0, 1)
    air_field = _air_field(t1)

    regions = np.zeros(gm_a.shape, np.uint8)
    parenchyma = (gm_a + wm_a) > 0.5
    deep = _ellipsoids(t1, DEEP_GREY) > 0.5
    ras = _world_ras(t1)
    infratentorial = (ras[2] < -12) & (ras[1] < -28)
    brainstem = infratentorial & (np.abs(ras[0]) < 11) & (ras[1] > -45)
    regions[parenchyma & ~infratentorial & (gm_a > 0.3)] = LOBAR
    # juxtacortical white matter counts as lobar too
    near_cortex = ndimage.binary_dilation(regions == LOBAR, iterations=2)
    regions[parenchyma & ~infratentorial & near_cortex & (regions == 0)] = LOBAR
    regions[parenchyma & deep] = DEEP
    regions[parenchyma & infratentorial & ~brainstem] = CEREBELLUM
    regions[parenchyma & brainstem] = BRAINSTEM

    arrays = [gm_a, wm_a, brain_a, iron_a, air_field]
    channels = sitk.Compose([image_like(a.astype(np.float32), t1) for a in arrays])
    return Template(channels, image_like(regions, t1))


def _world_ras(reference: sitk.Image) -> list[np.ndarray]:
    """RAS mm coordinates (x, y, z arrays over the (z, y, x) grid) of every voxel of `reference`."""
    zz, yy, xx = np.indices(reference.GetSize()[::-1], dtype=np.float32)
    origin, spacing = np.array(reference.GetOrigin()), np.array(reference.GetSpacing())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    lps = [origin[i] + direction[i, 0] * spacing[0] * xx + direction[i, 1] * spacing[1] * yy
           + direction[i, 2] * spacing[2] * zz for i in range(3)]
    return [-lps[0], -lps[1], lps[2]]


def _air_field(reference: sitk.Image) -> np.ndarray:
    """Field shift (ppm) of the air spaces, via the dipole kernel on a 2 mm grid, back on the template grid."""
    coarse = sitk.Resample(reference, [s // 2 for s in reference.GetSize()], sitk.Transform(), sitk.sitkLinear,
                           reference.GetOrigin(), [2.0, 2.0, 2.0], reference.GetDirection())
    air = _ellipsoids(coarse, AIR_SPACES, softness_mm=2.0) * CHI_AIR_MINUS_TISSUE_PPM
    field = field_shift_ppm(air, (2.0, 2.0, 2.0), pad_factor=1.5)
    # The template's direction flips x and y, which leaves the z-derivative structure of the kernel unchanged.
    field_image = image_like(field, coarse)
    return sitk.GetArrayFromImage(sitk.Resample(field_image, reference, sitk.Transform(), sitk.sitkLinear))


def random_subject_transform(rng: np.random.Generator, params: dict):
    """Subject world -> MNI world: scaling, rotation, translation about the brain centre, then smooth warping.

    Returns (the composite transform, its affine part, what was drawn)."""
    centre = _ras_to_lps(BRAIN_CENTRE_RAS)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    scale = rng.uniform(*params["scale_range"], size=3)
    angles = np.deg2rad(rng.uniform(-params["rotation_deg"], params["rotation_deg"], size=3))
    rotation = sitk.Euler3DTransform(centre, *angles).GetMatrix()
    matrix = np.array(rotation).reshape(3, 3) @ np.diag(1.0 / scale)
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(rng.uniform(-params["translation_mm"], params["translation_mm"], size=3).tolist())

    template = load_template().regions
    mesh = [params["warp_control_points"]] * 3
    warp = sitk.BSplineTransformInitializer(template, mesh, 3)
    coefficients = rng.normal(0.0, params["warp_mm"], size=len(warp.GetParameters()))
    warp.SetParameters(coefficients.tolist())
    drawn = {"scale": [round(float(v), 4) for v in scale], "rotation_deg": [round(float(v), 3) for v in np.rad2deg(angles)],
             "translation_mm": [round(float(v), 3) for v in affine.GetTranslation()],
             "warp_control_points": params["warp_control_points"], "warp_mm": params["warp_mm"]}
    return sitk.CompositeTransform([warp, affine]), affine, drawn  # applied last-added first: affine, then warp


DEFAULT_ANATOMY = {
    "scale_range": (0.9, 1.1),
    "rotation_deg": 5.0,
    "translation_mm": 5.0,
    "warp_control_points": 6,
    "warp_mm": 2.5,
}


@dataclass
class SubjectAnatomy:
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    iron: np.ndarray
    air_field_ppm: np.ndarray


def dense_transform(grid: sitk.Image, transform: sitk.Transform, step_mm: float = 3.0) -> sitk.Transform:
    """The smooth subject transform sampled as a displacement field every `step_mm` over `grid`'s extent.

    Evaluating the B-spline warp at every voxel dominates the run time; the transform is smooth on a scale of
    centimetres, so linear interpolation of a 3 mm displacement field is accurate to well under a voxel.
    """
    extent = np.array(grid.GetSize()) * np.array(grid.GetSpacing())
    size = [int(np.ceil(e / step_mm)) + 3 for e in extent]
    origin = np.array(grid.GetOrigin()) - np.array(grid.GetSpacing()) / 2 - step_mm
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size, origin.tolist(),
                                              [step_mm] * 3, grid.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def deform_onto(grid: sitk.Image, transform: sitk.Transform) -> SubjectAnatomy:
    """The template's tissue channels resampled (linear) onto `grid` through the subject transform."""
    template = load_template()
    moved = sitk.Resample(template.channels, grid, dense_transform(grid, transform), sitk.sitkLinear, 0.0)
    arrays = sitk.GetArrayFromImage(moved)  # (z, y, x, channel)
    gm, wm, brain, iron, air = (arrays[..., i] for i in range(len(CHANNELS)))
    csf = np.clip(brain - gm - wm, 0, 1)
    return SubjectAnatomy(gm, wm, csf, brain, iron, air)


def regions_onto(grid: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(load_template().regions, grid, transform, sitk.sitkNearestNeighbor))
