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
import scipy.fft
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
    # Domain randomisation (`PROFILES`): at these defaults each is off and a seed makes the same case as before.
    "anatomy_sources": ["mni2009a"],    # one drawn per case (anatomy.ANATOMY_SOURCES)
    "atrophy_mm": (0.0, 0.0),           # CSF grows into the tissue by up to this (wider sulci, larger ventricles)
    "wmh": (0, 0),                      # white-matter-hyperintensity-like patches (longer T2*, more PD)
    "contrast": "standard",             # "wide": tissue PD and T2* over wide ranges (physics.tissue_parameters)
    "iron_r2star_per_s": (10.0, 25.0),  # deep-grey-matter iron at 3 T
    "te_range_ms": (15.0, 35.0),        # echo time of the random grids
    "bias_order": (4, 4),               # control points per axis of the bias field (its spatial frequency)
    "gibbs": (0.0, 0.0),                # fraction of in-plane k-space cut off (ringing at edges)
    "ghosts": (0.0, 0.0),               # phase error (rad) of periodic motion along the phase-encode axis
    "slice_overlap": (0.0, 0.0),        # slice profile tails, in slice thicknesses (Gaussian sigma)
    "mask_edges": (0.0, 0.0),           # skull stripping's leftovers: residual rim (dura, sinus, CSF), cut cortex
    "vein_models": ["straight"],        # one drawn per vein (VEIN_MODELS)
    "flow_voids": (0, 0),               # dark arterial segments near the base of the brain
    "calcification_elsewhere": 0.0,     # chance that a calcification sits anywhere in the parenchyma
}

VEIN_MODELS = {
    "straight": "one straight cylinder, 5-25 mm (medullary radial, pial random)",
    "tortuous": "a chain of 2-6 mm pieces with bends, sometimes a branch or a crossing (medullary radial, pial "
                "along the surface)",
    "short": "one straight piece of 2-6 mm in a random direction",
}
CHOICES = {"anatomy_sources": tuple(anatomy.ANATOMY_SOURCES), "vein_models": tuple(VEIN_MODELS),
           "contrast": ("standard", "wide")}

# Named sets of parameters (`valdocmb-synth --profile NAME`). "randomised" is the training data of the shipped
# weights; "ood" is their out-of-distribution hold-out: its anatomy source, vein model, deep-grey iron and bias
# ranges (OOD_HELD_OUT) are never used in training.
RANDOMISED = {
    "anatomy_sources": ["mni2009a", "robex"],
    "anatomy": {"scale_range": (0.85, 1.15), "rotation_deg": 10.0, "translation_mm": 8.0,
                "warp_control_points": 7, "warp_mm": 4.0},
    "atrophy_mm": (0.0, 2.5), "wmh": (0, 12), "contrast": "wide", "iron_r2star_per_s": (5.0, 28.0),
    "te_range_ms": (15.0, 40.0), "te_jitter_ms": 5.0, "snr": (10.0, 60.0), "bias_amplitude": (0.05, 0.3),
    "bias_order": (2, 6), "texture_amplitude": (0.02, 0.1), "gibbs": (0.0, 0.3), "ghosts": (0.0, 0.15),
    "slice_overlap": (0.0, 0.6), "mask_edges": (0.0, 1.0), "veins": (10, 40), "vein_models": ["straight", "tortuous"],
    "vein_diameter_mm": (0.3, 2.2), "flow_voids": (0, 4), "calcifications": (0, 4), "calcification_elsewhere": 0.3,
}
OOD_HELD_OUT = {"anatomy_sources": ["pydeface"], "vein_models": ["short"], "veins": (20, 45),
                "iron_r2star_per_s": (30.0, 45.0), "bias_amplitude": (0.3, 0.42)}
PROFILES: dict[str, dict] = {"standard": {}, "randomised": RANDOMISED, "ood": {**RANDOMISED, **OOD_HELD_OUT}}

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


def draw_acquisition(rng: np.random.Generator, grid, te_range_ms=(15.0, 35.0), te_jitter_ms: float = 2.0) -> dict:
    """Grid, field strength and echo time: a VALDO cohort's (TE jittered), random, or an explicit dict."""
    if isinstance(grid, dict):
        return {"grid": grid.get("name", "custom"), "spacing": [float(s) for s in grid["spacing"]],
                "size": [int(s) for s in grid["size"]], "b0_tesla": float(grid["b0_tesla"]),
                "te_ms": float(grid["te_ms"])}
    if grid == "random":
        inplane = rng.uniform(0.42, 1.0)
        thickness = rng.uniform(0.8, 4.0)
        b0 = float(rng.choice([1.5, 3.0]))
        te = rng.uniform(*te_range_ms)
        size = (int(round(rng.uniform(220, 250) / inplane)),) * 2 + (int(round(rng.uniform(135, 155) / thickness)),)
        spacing = (inplane, inplane, thickness)
    else:
        spacing, size, b0, te = GRIDS[grid]
        te = te + rng.uniform(-te_jitter_ms, te_jitter_ms)
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
    check_choices(params)
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()
    acq = draw_acquisition(rng, grid, params["te_range_ms"], params["te_jitter_ms"])
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
    source = _one_of(rng, params["anatomy_sources"])
    transform, affine, anatomy_draw = anatomy.random_subject_transform(rng, params["anatomy"])
    anatomy_draw["source"] = source
    tissue = anatomy.deform_onto(anat_grid, transform, source)
    drawn: dict = {}  # the randomisation actually drawn for this case
    tp, tissue, magnitude, texture_amplitude = _tissue_signal(rng, params, tissue, b0, te, anat_spacing, spacing,
                                                             drawn)
    brain = tissue.brain

    # sub-slices -> slice thickness (with the slice profile's tails), then in-plane interpolation
    drawn["slice_overlap"] = _drawn(rng, params["slice_overlap"])
    if drawn["slice_overlap"] > 0:
        magnitude = ndimage.gaussian_filter1d(magnitude, drawn["slice_overlap"] * sub_slices, axis=0)
    magnitude, brain = (_average_slices(a, sub_slices) for a in (magnitude, brain))
    slab_grid = _grid_image(anat_size[:2] + [size[2]], anat_spacing[:2].tolist() + [spacing[2]], centre)
    magnitude = _to_grid(magnitude, slab_grid, acq_grid)
    brain = _to_grid(brain, slab_grid, acq_grid) > 0.5
    wm_signal = gre_magnitude(tp["pd"]["wm"], tp["t2star_ms"]["wm"], te)

    # -- susceptibility sources ----------------------------------------------------------------------------------
    regions_grid = _grid_image([int(np.ceil(s * sp / 2.0)) for s, sp in zip(size, spacing)], [2.0] * 3, centre)
    regions = anatomy.regions_onto(regions_grid, transform, source)
    parenchyma = _parenchyma_lookup(tissue, anat_grid)
    brain_at = _lookup(brain, acq_grid)
    sources = (_draw_microbleeds(rng, params, regions, regions_grid, parenchyma)
               + _draw_veins(rng, params, tissue, anat_grid, tp, te, wm_signal)
               + _draw_calcifications(rng, params, affine, parenchyma, brain_lookup=brain_at, tissue=tissue,
                                      grid=anat_grid)
               + _draw_flow_voids(rng, params, affine, brain_at))

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
    amplitude = rng.uniform(*params["bias_amplitude"])
    drawn["bias_order"] = _drawn(rng, params["bias_order"], integer=True)
    bias = _bias_field(rng, magnitude.shape, amplitude, drawn["bias_order"])
    signal = magnitude * factor * bias
    drawn["gibbs"], drawn["ghosts"] = _drawn(rng, params["gibbs"]), _drawn(rng, params["ghosts"])
    if drawn["gibbs"] > 0 or drawn["ghosts"] > 0:
        signal, drawn["phase_encode_axis"] = _kspace_artefacts(rng, signal, drawn["gibbs"], drawn["ghosts"])
    drawn["mask_edges"] = _drawn(rng, params["mask_edges"])
    if drawn["mask_edges"] > 0:
        brain, signal, drawn["mask_edge_voxels"] = _mask_edges(rng, brain, signal, bias * wm_signal,
                                                               drawn["mask_edges"], spacing)
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
    phase_image = image_like(np.where(brain, phase, 0).astype(np.float32), acq_grid) if phase is not None else None
    cmbs = [r for r in records if r["type"] == "cmb"]
    meta = {
        "seed": int(seed), "acquisition": {**acq, "snr_wm": round(float(snr), 3),
                                           "bias_amplitude": round(float(bias.max() - 1), 4),
                                           "scanner_scale": round(float(scanner_scale), 3)},
        "tissue": _rounded(tp), "texture_amplitude": round(float(texture_amplitude), 4),
        "randomisation": _rounded(drawn),
        "anatomy": anatomy_draw, "label_threshold": params["label_threshold"],
        "counts": {"cmb": len(cmbs), "cmb_visible": sum(bool(r.get("visible")) for r in cmbs),
                   "vein": sum(r["type"] == "vein" for r in records),
                   "calcification": sum(r["type"] == "calcification" for r in records),
                   "flow_void": sum(r["type"] == "flow_void" for r in records),
                   "label_components": int(ndimage.label(label, np.ones((3, 3, 3)))[1])},
        "objects": records, "seconds": round(time.perf_counter() - t_start, 2),
        "physics": "dipole kernel in k-space on <= %.2f mm grids, complex voxel averaging" % params["fine_mm"],
    }
    return SimulatedCase(image, label_image, phase_image, meta)


def _tissue_signal(rng, params, tissue, b0, te, anat_spacing, spacing, drawn: dict):
    """Tissue parameters, atrophy, white-matter patches, the tissues' GRE magnitude with air dephasing and texture,
    on the anatomy grid: (tissue parameters, anatomy after atrophy, magnitude, texture amplitude). Shared by whole
    cases and regions (`synth.region`); the draws stay in simulate_case's original order."""
    tp = tissue_parameters(b0, rng, wide=params["contrast"] == "wide", iron_r2star_per_s=params["iron_r2star_per_s"])
    drawn["atrophy_mm"] = _drawn(rng, params["atrophy_mm"])
    tissue = _atrophy(tissue, drawn["atrophy_mm"], anat_spacing)
    drawn["wmh"] = _drawn(rng, params["wmh"], integer=True)

    gm_t2 = 1.0 / (1.0 / tp["t2star_ms"]["gm"] + tissue.iron * tp["iron_r2star_per_s"] / 1000.0)
    if drawn["wmh"]:
        wmh = _wmh_map(rng, drawn["wmh"], tissue, anat_spacing)
        drawn["wmh_t2star_factor"], drawn["wmh_pd_factor"] = rng.uniform(1.3, 2.0), rng.uniform(1.03, 1.15)
        wm_term = gre_magnitude(tp["pd"]["wm"] * (1 + wmh * (drawn["wmh_pd_factor"] - 1)),
                                tp["t2star_ms"]["wm"] * (1 + wmh * (drawn["wmh_t2star_factor"] - 1)), te)
    else:
        wm_term = gre_magnitude(tp["pd"]["wm"], tp["t2star_ms"]["wm"], te)
    magnitude = (tissue.gm * gre_magnitude(tp["pd"]["gm"], gm_t2, te)
                 + tissue.wm * wm_term
                 + tissue.csf * gre_magnitude(tp["pd"]["csf"], tp["t2star_ms"]["csf"], te))
    magnitude *= _air_dephasing(tissue.air_field_ppm, anat_spacing, spacing, b0, te)
    texture = ndimage.gaussian_filter(rng.standard_normal(magnitude.shape).astype(np.float32), 1.5)
    texture_amplitude = rng.uniform(*params["texture_amplitude"])
    magnitude *= 1.0 + texture_amplitude * texture / (texture.std() + 1e-6)
    return tp, tissue, magnitude, texture_amplitude


# ---------------------------------------------------------------------------------------------------------------
def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(float(value), 4)


def check_choices(params: dict) -> None:
    """ValueError naming the parameter when a named choice is not one the simulator has."""
    for name, allowed in CHOICES.items():
        values = params[name] if isinstance(params[name], list) else [params[name]]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise ValueError(f"{name}: {unknown or values} not among {', '.join(allowed)}")


def _one_of(rng, names: list):
    """One of `names`; a list of one is chosen without drawing, so the default stream is unchanged."""
    return names[0] if len(names) == 1 else names[int(rng.integers(len(names)))]


def _drawn(rng, value_range, integer: bool = False):
    """A value from [low, high]; a range of one value is taken without drawing (unchanged default stream)."""
    low, high = value_range
    if low == high:
        return low
    return int(rng.integers(low, high, endpoint=True)) if integer else float(rng.uniform(low, high))


def _atrophy(tissue, mm: float, spacing_xyz):
    """CSF spreads into the tissue next to it by up to `mm`: sulci widen and ventricles grow; GM and WM give way."""
    if mm <= 0:
        return tissue
    size = [2 * max(1, int(round(mm / s))) + 1 for s in spacing_xyz[::-1]]
    grown = ndimage.uniform_filter(ndimage.grey_dilation(tissue.csf, size=size), 3)
    csf = np.maximum(tissue.csf, 0.8 * grown * tissue.brain).astype(np.float32)
    parenchyma = tissue.gm + tissue.wm
    keep = np.clip((tissue.brain - csf) / np.maximum(parenchyma, 1e-6), 0, 1).astype(np.float32)
    return anatomy.SubjectAnatomy(tissue.gm * keep, tissue.wm * keep, csf, tissue.brain, tissue.iron * keep,
                                  tissue.air_field_ppm)


def _wmh_map(rng, count: int, tissue, spacing_xyz) -> np.ndarray:
    """Soft (0..1) white-matter patches of 2-8 mm radii, centred in deep white matter."""
    wmh = np.zeros(tissue.wm.shape, np.float32)
    pool = np.argwhere(tissue.wm > 0.9)
    if len(pool) == 0:
        return wmh
    step = np.asarray(spacing_xyz, float)[::-1]
    for _ in range(count):
        centre = pool[rng.integers(len(pool))]
        radii = rng.uniform(2.0, 8.0, 3) / step
        lo = np.maximum(centre - np.ceil(radii).astype(int) - 1, 0)
        hi = np.minimum(centre + np.ceil(radii).astype(int) + 2, wmh.shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        r = np.sqrt(((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
                    + ((xx - centre[2]) / radii[2]) ** 2)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        wmh[box] = np.maximum(wmh[box], np.clip((1.0 - r) * 2.0, 0, 1))
    return wmh * np.clip(tissue.wm, 0, 1)


def _kspace_artefacts(rng, signal: np.ndarray, gibbs: float, ghosts: float):
    """Gibbs ringing (in-plane k-space cut to its central 1 - `gibbs`) and motion ghosts (a periodic phase error
    of `ghosts` rad over the phase-encode lines), on each slice's magnitude."""
    axis = int(rng.choice([1, 2]))  # phase-encode axis (y or x)
    spectrum = scipy.fft.fft2(signal.astype(np.complex64), axes=(1, 2), workers=-1)
    if gibbs > 0:
        for ax in (1, 2):
            n = signal.shape[ax]
            frequency = np.abs(np.fft.fftfreq(n)) * 2  # 0 at the centre, 1 at the edge of k-space
            shape = [1, 1, 1]
            shape[ax] = n
            spectrum *= (frequency <= 1.0 - gibbs).reshape(shape)
    if ghosts > 0:
        n = signal.shape[axis]
        period = rng.uniform(3.0, 12.0)
        error = ghosts * np.sin(2 * np.pi * np.arange(n) / period + rng.uniform(0, 2 * np.pi))
        shape = [1, 1, 1]
        shape[axis] = n
        spectrum *= np.exp(1j * error).astype(np.complex64).reshape(shape)
    return np.abs(scipy.fft.ifft2(spectrum, axes=(1, 2), workers=-1)).astype(np.float32), axis


def _mask_edges(rng, brain: np.ndarray, signal: np.ndarray, tissue_level: np.ndarray, strength: float, spacing):
    """Skull stripping's leftovers: where a smooth random field is high, a rim of up to 3 * `strength` mm outside
    the brain stays in the mask (dura, sinus, CSF: its level drawn dark to bright); where it is low, up to
    2 * `strength` mm of cortex is cut off."""
    field = _bias_field(rng, brain.shape, 1.0, 4) - 1.0
    inplane = ndimage.generate_binary_structure(3, 1)
    inplane[0] = inplane[2] = False      # in-plane steps: slices may be thick
    grow = max(1, int(round(3.0 * strength / spacing[0])))
    cut = max(1, int(round(2.0 * strength / spacing[0])))
    rim = ndimage.binary_dilation(brain, inplane, iterations=grow) & ~brain & (field > 0.25)
    cut_off = brain & ~ndimage.binary_erosion(brain, inplane, iterations=cut) & (field < -0.35)
    levels = rng.uniform(0.15, 1.3, 2)
    mixing = np.clip(_bias_field(rng, brain.shape, 1.0, 6) - 0.5, 0, 1)
    rim_signal = tissue_level * (levels[0] * (1 - mixing) + levels[1] * mixing)
    signal = np.where(rim, rim_signal, signal).astype(np.float32)
    return (brain | rim) & ~cut_off, signal, {"kept_outside": int(rim.sum()), "cut_inside": int(cut_off.sum())}


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


def _bias_field(rng, shape, amplitude, order: int = 4) -> np.ndarray:
    coarse = rng.standard_normal((order,) * 3).astype(np.float32)
    smooth = ndimage.zoom(coarse, [s / order for s in shape], order=3, grid_mode=True, mode="nearest")
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
        sources.append(microbleed_at(rng, params, point, {"region": region}))
    return sources


def microbleed_at(rng, params, point, meta: dict) -> Source:
    """A microbleed at `point` (world mm): core diameter, and a magnetic moment drawn log-uniform."""
    diameter = rng.uniform(*params["cmb_core_diameter_mm"])
    moment = float(np.exp(rng.uniform(*np.log(params["cmb_moment_ppm_mm3"]))))
    radius = diameter / 2
    chi = moment / (4.0 / 3.0 * np.pi * radius**3)
    return Source("cmb", point, radius, chi, relative_signal=rng.uniform(0.0, 0.05), meta=meta)


def _draw_veins(rng, params, tissue, grid, tp, te, wm_signal) -> list[Source]:
    sulcal = np.argwhere((tissue.csf > 0.3) & (tissue.gm > 0.3))
    deep_wm = np.argwhere(tissue.wm > 0.9)
    centre = np.array(anatomy._ras_to_lps(anatomy.BRAIN_CENTRE_RAS))
    blood = gre_magnitude(0.85, tp["t2star_ms"]["venous_blood"], te) / wm_signal
    sources: list[Source] = []
    for _ in range(int(rng.integers(*params["veins"], endpoint=True))):
        model = _one_of(rng, params["vein_models"])
        medullary = rng.random() < 0.4 and len(deep_wm)
        pool = deep_wm if medullary else sulcal
        if len(pool) == 0:
            continue
        z, y, x = pool[rng.integers(len(pool))]
        point = np.array(grid.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
        radial = point - centre
        if medullary and model != "short":   # deep medullary veins run radially towards the ventricles
            axis = radial + rng.normal(0, 10, 3)
        else:
            axis = rng.normal(size=3)
            if model == "tortuous":           # pial veins follow the surface: drop most of the radial part
                unit = radial / (np.linalg.norm(radial) + 1e-9)
                axis -= 0.9 * np.dot(axis, unit) * unit
        axis /= np.linalg.norm(axis)
        radius = rng.uniform(*params["vein_diameter_mm"]) / 2
        chi = rng.uniform(*params["vein_chi_ppm"])
        meta: dict = {"subtype": "medullary" if medullary else "pial"}
        if model == "tortuous":
            earlier = [n for v in sources if v.segments for n in v.meta["bends_mm"]]
            if earlier and rng.random() < 0.2:  # cross an earlier vein at one of its bends
                point = np.array(earlier[rng.integers(len(earlier))]) + rng.normal(0, 0.3, 3)
                meta["crossing_mm"] = [round(float(c), 3) for c in point]
            segments, ends, bends = _tortuous_path(rng, point, axis)
            meta.update(model=model, ends_mm=ends, bends_mm=bends, segments_mm=_rounded_segments(segments))
            sources.append(Source("vein", np.mean([a for a, _ in segments], axis=0), radius, chi,
                                  relative_signal=float(blood), segments=segments, meta=meta))
            continue
        length = rng.uniform(*params["vein_length_mm"]) if model == "straight" else rng.uniform(2.0, 6.0)
        if model != "straight":
            meta["model"] = model
        meta["ends_mm"] = [[round(float(c), 3) for c in point + sign * axis * length / 2] for sign in (-1, 1)]
        sources.append(Source("vein", point, radius, chi, relative_signal=float(blood), axis=axis, length_mm=length,
                              meta=meta))
    return sources


def _tortuous_path(rng, start, direction, pieces=(3, 8), piece_mm=(2.0, 6.0), turn=0.5):
    """A random-walk polyline from `start` (bends of ~30 degrees), sometimes with a side branch: its segments,
    end points and bend points (world mm)."""
    def walk(origin, heading, count):
        nodes = [np.asarray(origin, float)]
        for _ in range(count):
            heading = heading + rng.normal(0, turn, 3)
            heading /= np.linalg.norm(heading)
            nodes.append(nodes[-1] + heading * rng.uniform(*piece_mm))
        return nodes

    nodes = walk(start, direction, int(rng.integers(*pieces, endpoint=True)))
    chains = [nodes]
    if rng.random() < 0.5:  # a branch from an inner node, leaving at a wide angle
        k = int(rng.integers(1, len(nodes) - 1))
        heading = nodes[k + 1] - nodes[k]
        side = np.cross(heading, rng.normal(size=3))
        branch_heading = heading / np.linalg.norm(heading) + rng.uniform(0.6, 2.0) * side / np.linalg.norm(side)
        chains.append(walk(nodes[k], branch_heading / np.linalg.norm(branch_heading), int(rng.integers(2, 5))))
    segments = [(a, b) for chain in chains for a, b in zip(chain[:-1], chain[1:])]
    rounded = lambda p: [round(float(c), 3) for c in p]  # noqa: E731
    ends = [rounded(chain[-1]) for chain in chains] + [rounded(nodes[0])]
    bends = [rounded(p) for chain in chains for p in chain[1:-1]]
    return segments, ends, bends


def _rounded_segments(segments) -> list:
    return [[[round(float(c), 3) for c in point] for point in segment] for segment in segments]


def _draw_calcifications(rng, params, affine, parenchyma, brain_lookup, tissue=None, grid=None) -> list[Source]:
    inverse = affine.GetInverse()
    sites = list(CALCIFICATION_SITES_RAS)
    anywhere = np.argwhere((tissue.gm + tissue.wm) > 0.8) if params["calcification_elsewhere"] > 0 else None
    sources = []
    for _ in range(int(rng.integers(*params["calcifications"], endpoint=True))):
        if anywhere is not None and len(anywhere) and rng.random() < params["calcification_elsewhere"]:
            z, y, x = anywhere[rng.integers(len(anywhere))]
            site, point = "elsewhere", np.array(grid.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
        else:
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


# Arteries whose flow voids sit near the base of the brain: MNI RAS mm, mirrored or not.
FLOW_VOID_SITES_RAS = {
    "middle_cerebral": ((38.0, 4.0, -8.0), True),
    "basilar": ((0.0, -22.0, -30.0), False),
    "posterior_cerebral": ((18.0, -32.0, -6.0), True),
    "internal_carotid": ((16.0, 4.0, -16.0), True),
}


def _draw_flow_voids(rng, params, affine, brain_lookup) -> list[Source]:
    """Dark tortuous arterial segments (no signal, no susceptibility of their own)."""
    count = _drawn(rng, params["flow_voids"], integer=True)
    inverse = affine.GetInverse()
    sites = list(FLOW_VOID_SITES_RAS)
    sources = []
    for _ in range(count):
        site = sites[rng.integers(len(sites))]
        (x, y, z), mirrored = FLOW_VOID_SITES_RAS[site]
        if mirrored and rng.random() < 0.5:
            x = -x
        point = np.array(inverse.TransformPoint(anatomy._ras_to_lps((x, y, z)))) + rng.normal(0, 3, 3)
        if brain_lookup(point) < 0.5:
            continue
        segments, ends, bends = _tortuous_path(rng, point, rng.normal(size=3), pieces=(2, 5), piece_mm=(3.0, 7.0))
        sources.append(Source("flow_void", point, rng.uniform(0.8, 1.8), 0.0,
                              relative_signal=rng.uniform(0.0, 0.15), segments=segments,
                              meta={"site": site, "ends_mm": ends, "bends_mm": bends,
                                    "segments_mm": _rounded_segments(segments)}))
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
