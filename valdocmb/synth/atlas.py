"""Build the MARS region atlas and the registration template that `valdocmb.core.location` ships with.

    python -m valdocmb.synth.atlas --out valdocmb/core/data

Both are derived from the MNI152 2009a symmetric templates in the nilearn wheel (T1, GM and WM probability maps;
licence in valdocmb/core/data/LICENSE-MNI152.txt): no package ships a lobar/deep/infratentorial atlas offline, so
the regions are drawn on the template's tissue maps with boundaries given as MNI coordinates (RAS mm):

- infratentorial: brainstem (|x| <= 12, -45 <= y <= -12, z <= -8) and cerebellum (behind y = -38, below a
  tentorium that rises posteriorly and falls laterally);
- deep: basal ganglia (caudate, putamen, pallidum) and thalamus as the simulator's ellipsoids, internal capsule (white
  matter within 5 mm of both the lentiform nucleus and the caudate or thalamus), external capsule (white matter
  within 4 mm lateral of the putamen), corpus callosum (midline white matter above the ventricles), and the deep
  and periventricular white matter (more than 5 mm from the cortex);
- lobar: cortex and juxtacortical white matter (within 5 mm of the cortex), split into insula, cingulate,
  occipital (behind y = -70), temporal (below the Sylvian fissure), frontal (in front of the central sulcus) and
  parietal.
These boundaries are approximations on the scale of a centimetre: they place a microbleed in the right lobe when it
is not near a lobe's edge. Sides follow the sign of MNI x. The files are small (the atlas on the template's 1 mm
grid, the template at 2 mm) and are committed; rebuild them with this command after changing a boundary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.imageio import image_like
from .anatomy import AIR_SPACES, DEEP_GREY, TEMPLATE, _ellipsoids, _world_ras, template_dir

# label: (region, MARS class); left labels are these, right labels these + RIGHT
REGIONS = {
    1: ("frontal", "lobar"), 2: ("parietal", "lobar"), 3: ("temporal", "lobar"), 4: ("occipital", "lobar"),
    5: ("insula", "lobar"), 6: ("cingulate", "lobar"),
    7: ("basal ganglia", "deep"), 8: ("thalamus", "deep"), 9: ("internal capsule", "deep"),
    10: ("external capsule", "deep"), 11: ("corpus callosum", "deep"), 12: ("deep white matter", "deep"),
    13: ("brainstem", "infratentorial"), 14: ("cerebellum", "infratentorial"),
}
RIGHT = 20
TEMPLATE_SPACING_MM = 2.0


def region_map(t1: sitk.Image, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Atlas labels (REGIONS; right hemisphere + RIGHT) on the template grid."""
    x, y, z = _world_ras(t1)
    ax = np.abs(x)
    parenchyma = brain & ((gm + wm) > 0.5)
    white = parenchyma & (wm >= gm)
    labels = np.zeros(gm.shape, np.uint8)

    brainstem = (ax <= 12) & (y >= -45) & (y <= -12) & (z <= -8)
    tentorium = -14 + 0.3 * np.clip(-40 - y, 0, None) - 0.5 * np.clip(ax - 25, 0, None)
    cerebellum = (y < -38) & (z < tentorium) & ~brainstem
    infratentorial = brainstem | cerebellum

    spacing = t1.GetSpacing()[::-1]
    ellipsoid = lambda names: _ellipsoids(t1, {n: DEEP_GREY[n] for n in names}) > 0.5  # noqa: E731
    caudate, putamen, pallidum, thalamus = (ellipsoid([n]) for n in ("caudate", "putamen", "pallidum", "thalamus"))
    basal_ganglia = caudate | putamen | pallidum
    distance = lambda mask: ndimage.distance_transform_edt(~mask, sampling=spacing)  # noqa: E731
    supratentorial = parenchyma & ~infratentorial
    internal_capsule = (white & (distance(putamen | pallidum) <= 5)
                        & (distance(caudate | thalamus) <= 5) & ~basal_ganglia & ~thalamus)
    external_capsule = white & (distance(putamen) <= 4) & (ax > 24) & ~basal_ganglia
    corpus_callosum = white & (ax <= 10) & (y >= -42) & (y <= 35) & (z >= 0) & (z <= 35)
    cortex = supratentorial & (gm > wm) & (gm > 0.3) & ~basal_ganglia & ~thalamus
    lobar = supratentorial & ((distance(cortex) <= 5) | cortex)
    deep_white = supratentorial & ~lobar

    sylvian = -5 + 0.45 * (15 - y)                 # the fissure rises posteriorly
    central = -10 - 0.5 * (z - 25)                 # y of the central sulcus, moving back towards the vertex
    insula = (ax >= 28) & (ax <= 40) & (y >= -30) & (y <= 28) & (z >= -12) & (z <= 22)
    cingulate = (ax <= 14) & (y >= -55) & (y <= 40) & (z >= -5) & (z <= 45)
    occipital = y < -70
    temporal = ~occipital & (((ax >= 20) & (z < sylvian) & (z < 10)) | ((ax >= 20) & (z < -8)))
    frontal = y > central

    order = [  # later assignments win
        (lobar & ~occipital & ~frontal, 2), (lobar & frontal, 1), (lobar & temporal, 3), (lobar & occipital, 4),
        (lobar & insula, 5), (lobar & cingulate & ~temporal, 6),
        (deep_white, 12), (corpus_callosum & ~cortex, 11), (external_capsule, 10), (internal_capsule, 9),
        (supratentorial & basal_ganglia, 7), (supratentorial & thalamus, 8),
        (parenchyma & cerebellum, 14), (parenchyma & brainstem, 13),
    ]
    for mask, label in order:
        labels[mask] = label
    labels[(labels > 0) & (x > 0)] += RIGHT
    return labels


def label_table() -> dict:
    table = {}
    for label, (region, mars) in REGIONS.items():
        table[str(label)] = {"region": region, "mars_class": mars, "side": "left"}
        table[str(label + RIGHT)] = {"region": region, "mars_class": mars, "side": "right"}
    return table


def build(out: Path) -> None:
    folder = template_dir()
    read = lambda name: sitk.ReadImage(str(folder / TEMPLATE.format(name)), sitk.sitkFloat32)  # noqa: E731
    t1, gm_image, wm_image = read("t1"), read("gm"), read("wm")
    gm, wm = sitk.GetArrayFromImage(gm_image) / 255.0, sitk.GetArrayFromImage(wm_image) / 255.0
    brain = ndimage.binary_fill_holes(sitk.GetArrayFromImage(t1) > 0) & (_ellipsoids(t1, AIR_SPACES) < 0.5)
    labels = region_map(t1, gm, wm, brain)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_like(labels, t1), str(out / "mni_regions.nii.gz"), useCompression=True)
    # the registration target: the skull-stripped T1 template at 2 mm, as a masked scan would look, non-zero
    # exactly inside the brain (resampled as a mask), so that location.py can measure the brain overlap
    size = [int(round(s * sp / TEMPLATE_SPACING_MM)) for s, sp in zip(t1.GetSize(), t1.GetSpacing())]
    coarse = lambda image: sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(),  # noqa: E731
                                         [TEMPLATE_SPACING_MM] * 3, t1.GetDirection(), 0.0, sitk.sitkFloat32)
    t1_brain = image_like(np.where(brain, sitk.GetArrayFromImage(t1), 0).astype(np.float32), t1)
    intensity = sitk.GetArrayFromImage(coarse(sitk.SmoothingRecursiveGaussian(t1_brain, TEMPLATE_SPACING_MM / 2.5)))
    inside = sitk.GetArrayFromImage(coarse(image_like(brain.astype(np.float32), t1))) > 0.5
    scaled = np.clip(intensity / np.percentile(intensity[inside], 99.5), 0, 1) * 254 + 1
    reference = coarse(t1)
    sitk.WriteImage(image_like(np.where(inside, np.round(scaled), 0).astype(np.uint8), reference),
                    str(out / "mni_t1_brain_2mm.nii.gz"), useCompression=True)
    counts = {str(k): int(v) for k, v in zip(*np.unique(labels[labels > 0], return_counts=True))}
    (out / "mni_regions.json").write_text(json.dumps({
        "source": "MNI152 2009a symmetric (nilearn wheel): T1, GM, WM; regions by valdocmb.synth.atlas",
        "labels": label_table(), "voxels": counts}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.synth.atlas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "core" / "data")
    build(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
