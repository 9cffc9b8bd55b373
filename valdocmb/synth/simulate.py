"""One simulated case: anatomy -> tissue signal -> susceptibility sources -> acquisition -> labels.

Everything random is drawn from one numpy Generator seeded per case, so a seed reproduces a case bit for bit.
Order of work (all on axis-aligned grids, B0 along z):
1. acquisition: grid (VALDO cohorts or random in-between), field strength, echo time, SNR;
2. anatomy on an "anatomy grid" (~1 mm in-plane, <= 1 mm sub-slices): deformed MNI tissue maps, per-tissue PD and
   T2*, deep-nuclei iron (shorter T2*), air-tissue dephasing (sinc of the field gradient across the voxel), texture;
   sub-slices averaged into the acquisition slice thickness (partial voluming), then interpolated in-plane;
3. sources (microbleeds, veins, calcifications) rendered through the dipole field on fine grids (`objects`): their
   voxel factors multiply the signal (magnitudes multiply, phases add);
4. bias field, Rician noise, skull stripping (VALDO scans are "desc-masked");
5. labels: each microbleed's visible blob, the connected voxels around its core whose signal fell below
   `label_threshold` of the surrounding tissue (a rater's view), inside the brain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.imageio import image_like
from . import anatomy
from .objects import Source, render
from .physics import GAMMA_BAR_HZ_PER_T, gre_magnitude, tissue_parameters

# name: (spacing x, y, z mm, size x, y, z, B0 T, TE ms) -- the VALDO 2021 cohorts' T2* protocols
GRIDS = {
    "rss": ((0.488, 0.488, 0.8), (512, 512, 192), 1.5, 31.0),
    "sabre": ((0.449, 0.449, 4.0), (512, 512, 35), 3.0, 21.0),
    "alfa3": ((1.0, 1.0, 3.0), (256, 256, 48), 3.0, 23.0),
    "alfa4": ((1.0, 1.0, 4.0), (256, 256, 36), 3.0, 23.0),
}
GRID_CHOICES = tuple(GRIDS) + ("random",)

DEFAULTS = {
    "cmb_free_fraction": 0.3,
    "cmb_max": 25,
    "cmb_mean_extra": 2.5,              # count = 1 + geometric with this mean, capped at cmb_max
    "cmb_core_diameter_mm": (0.5, 3.0),
    "cmb_moment_ppm_mm3": (0.3, 30.0),  # log-uniform
    "cmb_regions": {"lobar": 0.55, "deep": 0.25, "brainstem": 0.07, "cerebellum": 0.13},
    "veins": (8, 30),
    "vein_diameter_mm": (0.3, 2.0),
    "vein_chi_ppm": (0.4, 0.6),
    "vein_length_mm": (5.0, 25.0),
    "calcifications": (0, 3),
    "calcification_chi_ppm": (-5.0, -0.5),
    "calcification_diameter_mm": (1.0, 4.0),
    "snr": (12.0, 40.0),
    "bias_amplitude": (0.05, 0.25),
    "texture_amplitude": (0.02, 0.06),
    "label_threshold": 0.5,
    "fine_mm": 0.25,
    "te_jitter_ms": 2.0,
    "anatomy": anatomy.DEFAULT_ANATOMY,
}

CALCIFICATION_SITES_RAS = {
    "choroid_plexus": ((28.0, -40.0, 15.0), True),
    "pineal": ((0.0, -30.0, 4.0), False),
    "pallidum": ((19.0, -4.0, -1.0), True),
}


@dataclass
class SimulatedCase:
    image: sitk.Image        # int16 magnitude, skull-stripped (background 0, brain >= 1)
    label: sitk.Image        # uint8 visible-microbleed mask
    phase: sitk.Image | None
    meta: dict


def draw_acquisition(rng: np.random.Generator, grid) -> dict:
    """Grid, field strength and echo time: a VALDO cohort's (TE jittered), random, or an explicit dict."""
    if isinstance(grid, dict):
        return {"grid": grid.get("name", "custom"), "spacing": [float(s) for s in grid["spacing"]],
                "size": [int(s) for s in grid["size"]], "b0_tesla": float(grid["b0_tesla"]),
                "te_ms": float(grid["te_ms"])}
    if grid == "random":
        inplane = rng.uniform(0.42, 1.0)
        thickness = rng.uniform(0.8, 4.0)
        b0 = float(rng.choice([1.5, 3.0]))
        te = rng.uniform(15.0, 35.0)
        size = (int(round(rng.uniform(220, 250) / inplane)),) * 2 + (int(round(rng.uniform(135, 155) / thickness)),)
        spacing = (inplane, inplane, thickness)
    else:
        spacing, size, b0, te = GRIDS[grid]
        te = te + rng.uniform(-DEFAULTS["te_jitter_ms"], DEFAULTS["te_jitter_ms"])
    return {"grid": grid, "spacing": [float(s) for s in spacing], "size": [int(s) for s in size],
            "b0_tesla": float(b0), "te_ms": float(te)}


def _grid_image(size, spacing, centre_lps) -> sitk.Image:
    image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(c - (n - 1) * s / 2) for c, n, s in zip(centre_lps, size, spacing)])
    return image


def simulate_case(seed: int, grid="random", with_phase: bool = False, **overrides) -> SimulatedCase:
    """Simulate one case. `grid`: a name in GRID_CHOICES or a dict with spacing, size, b0_tesla, te_ms."""
    params = {**DEFAULTS, **overrides}
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()
    acq = draw_acquisition(rng, grid)
    spacing, size, b0, te = np.array(acq["spacing"]), acq["size"], acq["b0_tesla"], acq["te_ms"]
    centre = anatomy._ras_to_lps(anatomy.BRAIN_CENTRE_RAS)
    acq_grid = _grid_image(size, spacing, centre)

    # -- anatomy and tissue signal on the anatomy grid --------------------------------------------------------
    inplane_factor = np.where(spacing[:2] < 0.7, 2, 1)
    sub_slices = max(1, int(round(spacing[2] / 1.0)))
    anat_spacing = np.array([spacing[0] * inplane_factor[0], spacing[1] * inplane_factor[1], spacing[2] / sub_slices])
    anat_size = [int(np.ceil(size[0] / inplane_factor[0])), int(np.ceil(size[1] / inplane_factor[1])),
                 size[2] * sub_slices]
    anat_grid = _grid_image(anat_size, anat_spacing, centre)
    transform, affine, anatomy_draw = anatomy.random_subject_transform(rng, params["anatomy"])
    tissue = anatomy.deform_onto(anat_grid, transform)
    tp = tissue_parameters(b0, rng)

    gm_t2 = 1.0 / (1.0 / tp["t2star_ms"]["gm"] + tissue.iron * tp["iron_r2star_per_s"] / 1000.0)
    magnitude = (tissue.gm * gre_magnitude(tp["pd"]["gm"], gm_t2, te)
                 + tissue.wm * gre_magnitude(tp["pd"]["wm"], tp["t2star_ms"]["wm"], te)
                 + tissue.csf * gre_magnitude(tp["pd"]["csf"], tp["t2star_ms"]["csf"], te))
    magnitude *= _air_dephasing(tissue.air_field_ppm, anat_spacing, spacing, b0, te)
    texture = ndimage.gaussian_filter(rng.standard_normal(magnitude.shape).astype(np.float32), 1.5)
    texture_amplitude = rng.uniform(*params["texture_amplitude"])
    magnitude *= 1.0 + texture_amplitude * texture / (texture.std() + 1e-6)
    brain = tissue.brain

    # sub-slices -> slice thickness, then in-plane interpolation to the acquisition grid
    magnitude, brain = (_average_slices(a, sub_slices) for a in (magnitude, brain))
    slab_grid = _grid_image(anat_size[:2] + [size[2]], anat_spacing[:2].tolist() + [spacing[2]], centre)
    magnitude = _to_grid(magnitude, slab_grid, acq_grid)
    brain = _to_grid(brain, slab_grid, acq_grid) > 0.5
    wm_signal = gre_magnitude(tp["pd"]["wm"], tp["t2star_ms"]["wm"], te)

    # -- susceptibility sources ----------------------------------------------------------------------------------
    regions_grid = _grid_image([int(np.ceil(s * sp / 2.0)) for s, sp in zip(size, spacing)], [2.0] * 3, centre)
    regions = anatomy.regions_onto(regions_grid, transform)
    parenchyma = _parenchyma_lookup(tissue, anat_grid)
    sources = (_draw_microbleeds(rng, params, regions, regions_grid, parenchyma)
               + _draw_veins(rng, params, tissue, anat_grid, tp, te, wm_signal)
               + _draw_calcifications(rng, params, affine, parenchyma, brain_lookup=_lookup(brain, acq_grid)))

    factor = np.ones(magnitude.shape, np.float32)
    phase = np.zeros(magnitude.shape, np.float32) if with_phase else None
    label = np.zeros(magnitude.shape, np.uint8)
    records = []
    for source in sources:
        rendered = render(source, magnitude.shape, spacing, acq_grid.GetOrigin(), b0, te, params["fine_mm"])
        mni = anatomy._ras_to_lps(transform.TransformPoint([float(c) for c in source.centre_mm]))
        record = {"type": source.kind, "centre_mm": [round(float(c), 3) for c in source.centre_mm],
                  "mni_ras_mm": [round(float(c), 2) for c in mni],  # where the subject transform puts it
                  "core_diameter_mm": round(2 * source.radius_mm, 3), "chi_ppm": round(source.chi_ppm, 4),
                  "moment_ppm_mm3": round(source.moment_ppm_mm3, 4), **source.meta}
        if rendered is None:
            record["visible"] = False
            records.append(record)
            continue
        factor[rendered.slices] *= np.abs(rendered.factor)
        if phase is not None:
            phase[rendered.slices] += np.angle(rendered.factor)
        if source.kind == "cmb":
            blob = _visible_blob(np.abs(rendered.factor), rendered, source, spacing, acq_grid,
                                 params["label_threshold"]) & brain[rendered.slices]
            label[rendered.slices] |= blob.astype(np.uint8)
            volume = float(blob.sum() * np.prod(spacing))
            record.update(visible=bool(blob.any()), visible_volume_mm3=round(volume, 3),
                          visible_diameter_mm=round((6 * volume / np.pi) ** (1 / 3), 3))
        records.append(record)

    # -- acquisition: bias field, Rician noise, skull stripping ------------------------------------------------------
    bias = _bias_field(rng, magnitude.shape, rng.uniform(*params["bias_amplitude"]))
    signal = magnitude * factor * bias
    snr = rng.uniform(*params["snr"])
    sigma = np.float32(wm_signal / snr)
    noisy = np.hypot(signal + sigma * rng.standard_normal(signal.shape, np.float32),
                     sigma * rng.standard_normal(signal.shape, np.float32))
    scanner_scale = rng.uniform(200.0, 2000.0)
    # stored as int16, as scanners do (scanner_scale keeps the brain's values in the hundreds to thousands)
    scaled = np.clip(np.rint(noisy * np.float32(scanner_scale)), 1, np.iinfo(np.int16).max)
    image_array = np.where(brain, scaled, 0).astype(np.int16)
    label &= brain.astype(np.uint8)

    image = image_like(image_array, acq_grid)
    label_image = image_like(label, acq_grid)
    phase_image = image_like(np.where(brain, phase, 0).astype(np.float32), acq_grid) if with_phase else None
    cmbs = [r for r in records if r["type"] == "cmb"]
    meta = {
        "seed": int(seed), "acquisition": {**acq, "snr_wm": round(float(snr), 3),
                                           "bias_amplitude": round(float(bias.max() - 1), 4),
                                           "scanner_scale": round(float(scanner_scale), 3)},
        "tissue": _rounded(tp), "texture_amplitude": round(float(texture_amplitude), 4),
        "anatomy": anatomy_draw, "label_threshold": params["label_threshold"],
        "counts": {"cmb": len(cmbs), "cmb_visible": sum(bool(r.get("visible")) for r in cmbs),
                   "vein": sum(r["type"] == "vein" for r in records),
                   "calcification": sum(r["type"] == "calcification" for r in records),
                   "label_components": int(ndimage.label(label, np.ones((3, 3, 3)))[1])},
        "objects": records, "seconds": round(time.perf_counter() - t_start, 2),
        "physics": "dipole kernel in k-space on <= %.2f mm grids, complex voxel averaging" % params["fine_mm"],
    }
    return SimulatedCase(image, label_image, phase_image, meta)


# ---------------------------------------------------------------------------------------------------------------
def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(float(value), 4)


def _average_slices(array: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return array
    return array.reshape(array.shape[0] // n, n, *array.shape[1:]).mean(axis=1)


def _to_grid(array: np.ndarray, source_grid: sitk.Image, target_grid: sitk.Image) -> np.ndarray:
    image = image_like(array.astype(np.float32), source_grid)
    return sitk.GetArrayFromImage(sitk.Resample(image, target_grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat32, True))


def _air_dephasing(field_ppm, anat_spacing, acq_spacing, b0, te) -> np.ndarray:
    """|sinc| attenuation from the field gradient across an acquisition voxel, per axis (linear-gradient model)."""
    rad_per_ppm = 2 * np.pi * GAMMA_BAR_HZ_PER_T * b0 * 1e-6 * te * 1e-3
    attenuation = np.ones(field_ppm.shape, np.float32)
    for axis, (step, width) in enumerate(zip(anat_spacing[::-1], acq_spacing[::-1])):
        gradient = np.gradient(field_ppm, step, axis=axis)                # ppm / mm
        spread = rad_per_ppm * gradient * width                            # phase across the voxel
        attenuation *= np.abs(np.sinc(spread / (2 * np.pi))).astype(np.float32)
    return attenuation


def _bias_field(rng, shape, amplitude) -> np.ndarray:
    coarse = rng.standard_normal((4, 4, 4)).astype(np.float32)
    smooth = ndimage.zoom(coarse, [s / 4 for s in shape], order=3, grid_mode=True, mode="nearest")
    smooth = smooth[: shape[0], : shape[1], : shape[2]]
    smooth /= np.abs(smooth).max() + 1e-6
    return (1.0 + amplitude * smooth).astype(np.float32)


def _lookup(array: np.ndarray, grid: sitk.Image):
    """value_at(point_mm) on `grid` (nearest voxel; 0 outside)."""
    def value_at(point):
        index = grid.TransformPhysicalPointToIndex([float(p) for p in point])
        if all(0 <= i < s for i, s in zip(index, grid.GetSize())):
            return float(array[index[2], index[1], index[0]])
        return 0.0
    return value_at


def _parenchyma_lookup(tissue, grid):
    gm_at, wm_at = _lookup(tissue.gm, grid), _lookup(tissue.wm, grid)
    return lambda p: gm_at(p) + wm_at(p)


def _draw_microbleeds(rng, params, regions, regions_grid, parenchyma) -> list[Source]:
    if rng.random() < params["cmb_free_fraction"]:
        return []
    count = min(params["cmb_max"], 1 + rng.geometric(1.0 / (1.0 + params["cmb_mean_extra"])) - 1)
    names = list(params["cmb_regions"])
    weights = np.array([params["cmb_regions"][n] for n in names])
    label_of = {v: k for k, v in anatomy.REGION_NAMES.items()}
    sources = []
    for _ in range(count):
        for _attempt in range(50):
            region = names[rng.choice(len(names), p=weights / weights.sum())]
            voxels = np.argwhere(regions == label_of[region])
            if len(voxels) == 0:
                continue
            z, y, x = voxels[rng.integers(len(voxels))]
            point = np.array(regions_grid.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
            point += rng.uniform(-1.0, 1.0, 3)
            if parenchyma(point) > 0.6:
                break
        else:
            continue
        diameter = rng.uniform(*params["cmb_core_diameter_mm"])
        moment = float(np.exp(rng.uniform(*np.log(params["cmb_moment_ppm_mm3"]))))
        radius = diameter / 2
        chi = moment / (4.0 / 3.0 * np.pi * radius**3)
        sources.append(Source("cmb", point, radius, chi, relative_signal=rng.uniform(0.0, 0.05),
                              meta={"region": region}))
    return sources


def _draw_veins(rng, params, tissue, grid, tp, te, wm_signal) -> list[Source]:
    sulcal = np.argwhere((tissue.csf > 0.3) & (tissue.gm > 0.3))
    deep_wm = np.argwhere(tissue.wm > 0.9)
    centre = np.array(anatomy._ras_to_lps(anatomy.BRAIN_CENTRE_RAS))
    blood = gre_magnitude(0.85, tp["t2star_ms"]["venous_blood"], te) / wm_signal
    sources = []
    for _ in range(int(rng.integers(*params["veins"], endpoint=True))):
        medullary = rng.random() < 0.4 and len(deep_wm)
        pool = deep_wm if medullary else sulcal
        if len(pool) == 0:
            continue
        z, y, x = pool[rng.integers(len(pool))]
        point = np.array(grid.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
        if medullary:   # deep medullary veins run radially towards the ventricles
            axis = point - centre + rng.normal(0, 10, 3)
        else:
            axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        sources.append(Source("vein", point, rng.uniform(*params["vein_diameter_mm"]) / 2,
                              rng.uniform(*params["vein_chi_ppm"]), relative_signal=float(blood), axis=axis,
                              length_mm=rng.uniform(*params["vein_length_mm"]),
                              meta={"subtype": "medullary" if medullary else "pial"}))
    return sources


def _draw_calcifications(rng, params, affine, parenchyma, brain_lookup) -> list[Source]:
    inverse = affine.GetInverse()
    sites = list(CALCIFICATION_SITES_RAS)
    sources = []
    for _ in range(int(rng.integers(*params["calcifications"], endpoint=True))):
        site = sites[rng.integers(len(sites))]
        (x, y, z), mirrored = CALCIFICATION_SITES_RAS[site]
        if mirrored and rng.random() < 0.5:
            x = -x
        point = np.array(inverse.TransformPoint(anatomy._ras_to_lps((x, y, z)))) + rng.uniform(-2, 2, 3)
        if brain_lookup(point) < 0.5:
            continue
        sources.append(Source("calcification", point, rng.uniform(*params["calcification_diameter_mm"]) / 2,
                              rng.uniform(*params["calcification_chi_ppm"]), relative_signal=rng.uniform(0.1, 0.3),
                              meta={"site": site}))
    return sources


def _visible_blob(drop, rendered, source, spacing, grid, threshold) -> np.ndarray:
    """The connected voxels (26-neighbourhood) below `threshold` that contain the darkest voxel near the core."""
    below = drop < threshold
    if not below.any():
        return below
    lo = rendered.lo
    zz, yy, xx = np.indices(drop.shape)
    origin = np.array(grid.GetOrigin())
    centre_index = (source.centre_mm - origin) / spacing          # (x, y, z) continuous index
    dist = np.sqrt(((xx + lo[2] - centre_index[0]) * spacing[0]) ** 2
                   + ((yy + lo[1] - centre_index[1]) * spacing[1]) ** 2
                   + ((zz + lo[0] - centre_index[2]) * spacing[2]) ** 2)
    near = dist <= max(source.radius_mm, spacing.max() / 2) + spacing.max()
    if not (below & near).any():
        return np.zeros_like(below)
    seed = np.unravel_index(np.argmin(np.where(near, drop, np.inf)), drop.shape)
    labels, _ = ndimage.label(below, np.ones((3, 3, 3)))
    return labels == labels[seed]
