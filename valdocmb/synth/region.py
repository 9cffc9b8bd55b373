"""One simulated region: a window of a simulated scan, rendered alone and brought onto the processing grid.

Training reads crops of a few centimetres; a whole simulated scan (10-30 CPU-seconds, then preprocessing) yields a
few dozen of them. A region draws a case as `simulate_case` does (acquisition grid, field strength, echo time,
anatomy source, subject transform, tissue contrast, SNR, bias, artefacts, skull-stripping edges), puts a window
anywhere in its brain, and renders only that window, on the acquisition grid's own voxels (the same partial
voluming of thick slices), with microbleeds and mimics placed inside it:
- microbleeds: `cmb_per_region` of them at parenchyma points of the window, drawn as `simulate_case` draws them;
- veins: the case's count scaled by the window's share of the brain, times `mimic_density` (mimics are rare per
  crop in whole scans, and the hard negatives are what training needs most); calcifications and flow voids at the
  case's sites when the window holds them, "elsewhere" calcifications in proportion;
- the whole scan's bias field, evaluated on the window;
- the z-score of preprocessing: the scan's foreground mean and standard deviation, computed on a 3 mm version of the
  same brain, contrast and bias (plus the noise's and texture's variance), so that the intensities match what
  `preprocess` gives for the whole scan within a few per cent.
The result is a block of the processing grid (`preprocess`'s resampling: B-spline for the scan, nearest for the
foreground and the label), as if cut from the preprocessed whole scan. `simulate_regions` cuts several windows
from one case (they share its whole-brain pass): about 0.5 CPU-second per region at three per case.

The z-score is approximate: on 4 randomised alfa3/alfa4 cases, windows' median intensities were 0.3 lower and
twice as spread (standard deviation of the medians 0.75 against 0.35) as 56x72x72 crops of the same kind of
preprocessed whole scans; training's intensity jitter covers that range.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.preprocess import DEFAULT_TARGET_SPACING
from . import anatomy
from .objects import render
from .physics import gre_magnitude
from .simulate import (
    DEFAULTS,
    _average_slices,
    _draw_calcifications,
    _draw_flow_voids,
    _draw_veins,
    _drawn,
    _grid_image,
    _kspace_artefacts,
    _lookup,
    _mask_edges,
    _one_of,
    _parenchyma_lookup,
    _tissue_signal,
    _to_grid,
    _visible_blob,
    check_choices,
    draw_acquisition,
    microbleed_at,
)

REGION_SHAPE = (56, 72, 72)   # z, y, x processing voxels: a 48x64x64 screening crop with +-4 voxels to move
COARSE_MM = 3.0               # the grid of the whole-brain pass (window placement and z-score statistics)
BIAS_STEP = 4                 # voxels between exact evaluations of the bias field


@dataclass
class Region:
    volume: np.ndarray        # float32 (z, y, x), z-scored like preprocess, 0 outside the foreground
    label: np.ndarray         # uint8, visible microbleeds
    foreground: np.ndarray    # bool
    sites: list = field(default_factory=list)   # (centre voxel (z, y, x), kind) of mimics inside the region
    meta: dict = field(default_factory=dict)


def simulate_regions(seed: int, grid="random", count: int = 1, shape=REGION_SHAPE,
                     target_spacing=DEFAULT_TARGET_SPACING, cmb_per_region=(0, 4), mimic_density: float = 3.0,
                     **overrides) -> list[Region]:
    """`count` regions of `shape` processing voxels (z, y, x) of one case simulated with `overrides` (a profile).
    The regions of a case share its acquisition, anatomy, contrast, bias field, artefact strengths, SNR and the
    whole-brain pass (about a third of a lone region's cost)."""
    params = {**DEFAULTS, **overrides}
    check_choices(params)
    rng = np.random.default_rng(seed)
    start_time = time.perf_counter()
    acq = draw_acquisition(rng, grid, params["te_range_ms"], params["te_jitter_ms"])
    spacing, size = np.array(acq["spacing"]), np.array(acq["size"])
    centre = np.array(anatomy._ras_to_lps(anatomy.BRAIN_CENTRE_RAS))
    source = _one_of(rng, params["anatomy_sources"])
    transform, affine, _ = anatomy.random_subject_transform(rng, params["anatomy"])

    # the whole brain at 3 mm: where the windows go, and the scan's z-score statistics
    coarse_grid = _grid_image(np.ceil(size * spacing / COARSE_MM).astype(int), [COARSE_MM] * 3, centre)
    coarse = anatomy.deform_onto(coarse_grid, transform, source)
    inside = np.argwhere(coarse.gm + coarse.wm > 0.5)
    if not len(inside):
        raise ValueError(f"seed {seed}: the subject's brain misses the field of view")
    case = {"params": params, "acq": acq, "source": source, "transform": transform, "affine": affine,
            "coarse": coarse,
            # the tissue signal draws from one stream per case: every window has the case's contrast
            "tissue_seed": int(rng.integers(2**62)),
            "drawn": {name: _drawn(rng, params[name]) for name in ("slice_overlap", "gibbs", "ghosts", "mask_edges")},
            "bias_amplitude": rng.uniform(*params["bias_amplitude"]),
            "bias_coefficients": rng.standard_normal((_drawn(rng, params["bias_order"], integer=True),) * 3
                                                     ).astype(np.float32),
            "snr": rng.uniform(*params["snr"]), "scale": None}
    regions = []
    for _ in range(count):
        pick = inside[rng.integers(len(inside))]
        window_centre = np.array(coarse_grid.TransformIndexToPhysicalPoint([int(v) for v in pick[::-1]]))
        window_centre += rng.uniform(-COARSE_MM / 2, COARSE_MM / 2, 3)
        region = _window(rng, case, window_centre, shape, target_spacing, cmb_per_region, mimic_density)
        region.meta.update(seed=int(seed), seconds=round(time.perf_counter() - start_time, 3))
        regions.append(region)
    return regions


def simulate_region(seed: int, grid="random", **options) -> Region:
    """One region of a case (`simulate_regions` with count 1)."""
    return simulate_regions(seed, grid, 1, **options)[0]


def _window(rng, case: dict, window_centre, shape, target_spacing, cmb_per_region, mimic_density) -> Region:
    """The case's window of `shape` processing voxels around `window_centre` (world mm)."""
    params, acq, coarse, drawn = case["params"], case["acq"], case["coarse"], case["drawn"]
    spacing, size, b0, te = np.array(acq["spacing"]), np.array(acq["size"]), acq["b0_tesla"], acq["te_ms"]
    centre = np.array(anatomy._ras_to_lps(anatomy.BRAIN_CENTRE_RAS))

    # -- the window on the processing, acquisition and anatomy grids (x, y, z) ----------------------------------
    target = np.asarray(target_spacing, float)
    acq_origin = centre - (size - 1) * spacing / 2
    proc_origin = acq_origin + (target - spacing) / 2                      # preprocess.resampled_grid
    shape_xyz = np.array(shape[::-1])
    proc_lo = np.round((window_centre - proc_origin) / target).astype(int) - shape_xyz // 2
    proc_window = _grid_image(shape_xyz, target, proc_origin + proc_lo * target)
    window_origin = np.array(proc_window.GetOrigin())
    acq_lo = np.floor((window_origin - acq_origin) / spacing).astype(int) - 2   # B-spline support
    acq_hi = np.ceil((window_origin + (shape_xyz - 1) * target - acq_origin) / spacing).astype(int) + 3
    acq_window_origin = acq_origin + acq_lo * spacing
    acq_window = _origin_corner(_grid_image(acq_hi - acq_lo, spacing, centre), acq_window_origin)
    inplane_factor = np.where(spacing[:2] < 0.7, 2, 1)
    sub_slices = max(1, int(round(spacing[2] / 1.0)))
    anat_spacing = np.array([spacing[0] * inplane_factor[0], spacing[1] * inplane_factor[1], spacing[2] / sub_slices])
    anat_size = np.array([np.ceil(size[0] / inplane_factor[0]), np.ceil(size[1] / inplane_factor[1]),
                          size[2] * sub_slices]).astype(int)
    anat_origin = centre - (anat_size - 1) * anat_spacing / 2
    anat_lo = np.floor((acq_window_origin - anat_origin) / anat_spacing).astype(int) - 1
    acq_window_end = acq_window_origin + (acq_hi - acq_lo - 1) * spacing
    anat_hi = np.ceil((acq_window_end - anat_origin) / anat_spacing).astype(int) + 2
    anat_lo[2], anat_hi[2] = acq_lo[2] * sub_slices, acq_hi[2] * sub_slices  # sub-slices nest in slices
    anat_window = _origin_corner(_grid_image(anat_hi - anat_lo, anat_spacing, centre),
                                 anat_origin + anat_lo * anat_spacing)
    slab_window = _origin_corner(_grid_image([*(anat_hi - anat_lo)[:2], acq_hi[2] - acq_lo[2]],
                                             [*anat_spacing[:2], spacing[2]], centre),
                                 [*(anat_origin + anat_lo * anat_spacing)[:2], acq_window_origin[2]])

    # -- tissue signal on the window, as simulate_case makes it --------------------------------------------------
    tissue = anatomy.deform_onto(anat_window, case["transform"], case["source"])
    tp, tissue, magnitude, texture_amplitude = _tissue_signal(np.random.default_rng(case["tissue_seed"]), params,
                                                             tissue, b0, te, anat_spacing, spacing, {})
    brain = tissue.brain
    if drawn["slice_overlap"] > 0:
        magnitude = ndimage.gaussian_filter1d(magnitude, drawn["slice_overlap"] * sub_slices, axis=0)
    magnitude, brain = (_average_slices(a, sub_slices) for a in (magnitude, brain))
    magnitude = _to_grid(magnitude, slab_window, acq_window)
    brain = _to_grid(brain, slab_window, acq_window) > 0.5
    wm_signal = gre_magnitude(tp["pd"]["wm"], tp["t2star_ms"]["wm"], te)

    # -- sources inside the window -------------------------------------------------------------------------------
    share = float((tissue.gm + tissue.wm).sum() * np.prod(anat_spacing)
                  / max(1e-6, (coarse.gm + coarse.wm).sum() * COARSE_MM**3))
    scaled = dict(params)
    scaled["veins"] = tuple(int(round(v * share * mimic_density)) for v in params["veins"])
    scaled["calcifications"] = (0, max(1, int(round(params["calcifications"][1] * share * mimic_density * 4))))
    parenchyma = _parenchyma_lookup(tissue, anat_window)
    brain_at = _lookup(brain, acq_window)
    sources = (_place_microbleeds(rng, params, tissue, anat_window, proc_window, cmb_per_region)
               + _draw_veins(rng, scaled, tissue, anat_window, tp, te, wm_signal)
               + _draw_calcifications(rng, scaled, case["affine"], parenchyma, brain_lookup=brain_at, tissue=tissue,
                                      grid=anat_window)
               + _draw_flow_voids(rng, params, case["affine"], brain_at))
    factor = np.ones(magnitude.shape, np.float32)
    label = np.zeros(magnitude.shape, np.uint8)
    points = []                                                           # (world mm, kind) of mimic sites
    for src in sources:
        rendered = render(src, magnitude.shape, spacing, acq_window.GetOrigin(), b0, te, params["fine_mm"])
        if rendered is None:
            continue
        factor[rendered.slices] *= np.abs(rendered.factor)
        if src.kind == "cmb":
            label[rendered.slices] |= (_visible_blob(np.abs(rendered.factor), rendered, src, spacing, acq_window,
                                                     params["label_threshold"]) & brain[rendered.slices])
        else:
            points.append((src.centre_mm, src.kind))
            points += [(p, f"{src.kind}_end") for p in src.meta.get("ends_mm", [])]
            points += [(p, f"{src.kind}_bend") for p in src.meta.get("bends_mm", [])]
            if "crossing_mm" in src.meta:
                points.append((src.meta["crossing_mm"], f"{src.kind}_crossing"))

    # -- acquisition: the scan's bias field, artefacts, skull-stripping edges, noise --------------------------------
    bias = _bias_on(case["bias_coefficients"], case["bias_amplitude"], size, acq_lo, magnitude.shape)
    signal = magnitude * factor * bias
    if drawn["gibbs"] > 0 or drawn["ghosts"] > 0:
        signal, _ = _kspace_artefacts(rng, signal, drawn["gibbs"], drawn["ghosts"])
    if drawn["mask_edges"] > 0:
        brain, signal, _ = _mask_edges(rng, brain, signal, bias * wm_signal, drawn["mask_edges"], spacing)
    sigma = np.float32(wm_signal / case["snr"])
    noisy = np.hypot(signal + sigma * rng.standard_normal(signal.shape, np.float32),
                     sigma * rng.standard_normal(signal.shape, np.float32))
    noisy = np.where(brain, np.maximum(noisy, 1e-3), 0).astype(np.float32)
    label &= brain.astype(np.uint8)
    if case["scale"] is None:
        case["scale"] = _whole_brain_scale(case, tp, float(sigma), texture_amplitude)
    mean, std = case["scale"]

    # -- onto the processing grid, as preprocess resamples a scan ----------------------------------------------
    def resampled(array, interpolation, pixel=sitk.sitkFloat32):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(acq_window)
        return sitk.GetArrayFromImage(sitk.Resample(image, proc_window, sitk.Transform(), interpolation, 0.0, pixel,
                                                    True))

    volume = resampled(noisy, sitk.sitkBSpline)
    foreground = resampled(brain.astype(np.uint8), sitk.sitkNearestNeighbor, sitk.sitkUInt8) > 0
    region_label = (resampled(label, sitk.sitkNearestNeighbor, sitk.sitkUInt8) > 0) & foreground
    volume = np.where(foreground, (volume - mean) / std, 0).astype(np.float32)
    sites = []
    for point, kind in points:
        index = np.round((np.asarray(point, float) - window_origin) / target).astype(int)[::-1]
        if np.all(index >= 0) and np.all(index < shape) and foreground[tuple(index)]:
            sites.append((tuple(int(v) for v in index), kind))
    meta = {"grid": acq["grid"], "spacing": acq["spacing"], "b0_tesla": b0, "te_ms": round(te, 2),
            "anatomy_source": case["source"], "snr": round(float(case["snr"]), 2), "brain_share": round(share, 4),
            "microbleeds": int(sum(s.kind == "cmb" for s in sources))}
    return Region(volume, region_label.astype(np.uint8), foreground, sites, meta)


def _whole_brain_scale(case: dict, tp: dict, sigma: float, texture_amplitude: float) -> tuple[float, float]:
    """The scan's foreground mean and standard deviation (preprocess's z-score), from the 3 mm pass: the tissues'
    signal times the bias field, plus the noise's and the texture's variance."""
    coarse, te = case["coarse"], case["acq"]["te_ms"]
    gm_t2 = 1.0 / (1.0 / tp["t2star_ms"]["gm"] + coarse.iron * tp["iron_r2star_per_s"] / 1000.0)
    signal = (coarse.gm * gre_magnitude(tp["pd"]["gm"], gm_t2, te)
              + coarse.wm * gre_magnitude(tp["pd"]["wm"], tp["t2star_ms"]["wm"], te)
              + coarse.csf * gre_magnitude(tp["pd"]["csf"], tp["t2star_ms"]["csf"], te))
    bias = _bias_on(case["bias_coefficients"], case["bias_amplitude"], np.array(signal.shape[::-1]),
                    np.zeros(3, int), signal.shape)
    values = (signal * bias)[coarse.brain > 0.5].astype(np.float64)
    std = np.sqrt(values.var() + float(sigma) ** 2 + texture_amplitude**2 * np.mean(values**2))
    return float(values.mean()), float(std)


def _origin_corner(image: sitk.Image, origin) -> sitk.Image:
    image.SetOrigin([float(v) for v in origin])
    return image


def _bias_on(coefficients: np.ndarray, amplitude: float, full_size_xyz, lo_xyz, shape_zyx) -> np.ndarray:
    """The bias field of a scan of `full_size_xyz` voxels (cubic spline through `coefficients`, spread over the
    whole field of view as `simulate._bias_field` spreads them) on its voxels lo..lo + shape. The field varies over
    centimetres: it is evaluated every BIAS_STEP voxels and interpolated linearly in between."""
    order = coefficients.shape[0]
    full_zyx = np.asarray(full_size_xyz)[::-1]
    lo_zyx = np.asarray(lo_xyz)[::-1]
    spline = ndimage.spline_filter(coefficients, order=3, mode="nearest")

    def evaluate(coordinate_axes):
        grid = np.meshgrid(*coordinate_axes, indexing="ij")
        return ndimage.map_coordinates(spline, grid, order=3, mode="nearest", prefilter=False)

    sparse = [np.linspace(lo, lo + n - 1, max(2, -(-n // BIAS_STEP) + 1)) for lo, n in zip(lo_zyx, shape_zyx)]
    values = evaluate([(v + 0.5) * order / full - 0.5 for v, full in zip(sparse, full_zyx)])
    field = ndimage.zoom(values, [n / len(v) for n, v in zip(shape_zyx, sparse)], order=1, grid_mode=False)
    field = field[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    # the whole field's largest magnitude, on a coarse sampling of the field of view (its normalisation)
    whole = evaluate([(np.arange(24) + 0.5) * order / 24 - 0.5] * 3)
    return (1.0 + amplitude * field / (np.abs(whole).max() + 1e-6)).astype(np.float32)


def _place_microbleeds(rng, params, tissue, anat_window, proc_window, count_range) -> list:
    """`count_range` microbleeds at parenchyma points of the window, away from its border by a third of its size
    (crops around the region's centre must hold them)."""
    count = _drawn(rng, count_range, integer=True)
    candidates = np.argwhere(tissue.gm + tissue.wm > 0.6)
    if not count or not len(candidates):
        return []
    origin = np.array(proc_window.GetOrigin())
    extent = np.array(proc_window.GetSize()) * np.array(proc_window.GetSpacing())
    world = np.array(anat_window.GetOrigin()) + candidates[:, ::-1] * np.array(anat_window.GetSpacing())
    central = np.all((world > origin + extent / 6) & (world < origin + extent * 5 / 6), axis=1)
    world = world[central]
    sources = []
    for _ in range(min(count, len(world))):
        point = world[rng.integers(len(world))] + rng.uniform(-0.5, 0.5, 3)
        sources.append(microbleed_at(rng, params, point, {"region": "window"}))
    return sources
