"""Training samples for the three stages, as the paper describes, drawn from a per-case pool of crops.

Each training case is preprocessed once (the same `preprocess` as inference) and reduced to a pool of crops on the
processing grid, big enough for augmentation of the largest network input:
- positives: one crop per connected component of the label, centred on its centroid;
- random negatives: random brain voxels away from any lesion;
- mimic crops: centred on the simulator's recorded veins, calcifications and flow voids (when a *_sim.json is
  present), the places where an initial screening model's false positives concentrate, and on the vessels' ends,
  bends and crossings (up to VESSEL_POINTS per case), where a vein cut by a slice looks most like a dot;
- mined crops (fine-tuning, `valdocmb-train --init`): the false positives that given weights make on the whole
  scan, candidates away from every labelled lesion ranked by the given discrimination network: on real scans of a
  new scanner, its veins, calcifications and artefacts, which no simulator recorded.
Augmentation (per draw): translation < 4 voxels, in-plane rotation < 10 degrees, lateral (x) flip. Samples are
re-drawn every iteration, so their count and the class proportion stay fixed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..core.imageio import read_mask, read_scan
from ..core.layouts import VALDO_LABEL, VALDO_T2S
from ..core.patches import extract_patches
from ..core.preprocess import DEFAULT_TARGET_SPACING, preprocess

log = logging.getLogger(__name__)

CROP = (36, 48, 48)          # z, y, x: room for +-4 voxel shifts and 10 degree turns of a 24x32x32 patch
MAX_SHIFT = 3                # voxels ("< 4")
MAX_ROTATION_DEG = 10.0
VESSEL_POINTS = 24           # vessel ends, bends and crossings per case (hard negatives)


@dataclass
class Crop:
    volume: np.ndarray        # float16 (CROP), processing grid
    label: np.ndarray         # uint8 (CROP)
    kind: str                 # "positive", "negative", "mimic"
    case: str
    meta: dict = field(default_factory=dict)


def find_training_cases(folder: Path) -> list[tuple[str, Path, Path]]:
    """(subject, scan, label) for each VALDO-named scan that has a label beside it."""
    folder = Path(folder)
    labels = {m.group(1): p for p in folder.iterdir() if (m := VALDO_LABEL.match(p.name))}
    cases = []
    for scan in sorted(folder.iterdir()):
        m = VALDO_T2S.match(scan.name)
        if m and m.group(1) in labels:
            cases.append((m.group(1), scan, labels[m.group(1)]))
    return cases


MINING_CANDIDATES = 400  # the highest-scoring screening candidates the discrimination network ranks when mining


def mined_sites(miner, volume: np.ndarray, foreground: np.ndarray, lesion_zone: np.ndarray, count: int) -> list:
    """The `count` candidates of `miner` (a ThreeStagePipeline with the given weights) outside `lesion_zone` that its
    discrimination network believes most, among its MINING_CANDIDATES best screening candidates: (centre voxel,
    "mined", scores) sites on the processing grid."""
    candidates = [c for c in miner.find_candidates(miner.screen(volume, foreground)) if not lesion_zone[c.centre]]
    candidates = candidates[:MINING_CANDIDATES]  # find_candidates lists them by screening score, highest first
    if not candidates:
        return []
    beliefs = miner.discriminate(volume, [c.centre for c in candidates])
    order = np.argsort(-beliefs, kind="stable")[:count]
    return [(np.array(candidates[i].centre), "mined", {"screening_score": candidates[i].screening_score,
                                                       "discrimination_score": float(beliefs[i])}) for i in order]


def case_pool(subject: str, scan_path: Path, label_path: Path, rng: np.random.Generator,
              negatives: int = 24, target_spacing=DEFAULT_TARGET_SPACING, miner=None,
              mined_per_case: int = 24) -> list[Crop]:
    """`miner`: a ThreeStagePipeline whose false positives on this scan become "mined" crops (see `mined_sites`)."""
    pre = preprocess(read_scan(scan_path), target_spacing)
    label = pre.from_original(read_mask(label_path), "nearest") >= 0.5
    volume = pre.array
    sites: list[tuple] = []   # (centre voxel, kind, meta)
    components, n = ndimage.label(label, np.ones((3, 3, 3)))
    for centre in ndimage.center_of_mass(label, components, range(1, n + 1)) if n else []:
        sites.append((np.round(centre).astype(int), "positive", {}))

    lesion_zone = ndimage.binary_dilation(label, iterations=6) if n else np.zeros_like(label)
    brain = np.argwhere(pre.foreground & ~lesion_zone)
    for index in rng.choice(len(brain), size=min(negatives, len(brain)), replace=False):
        sites.append((brain[index], "negative", {}))

    sim_json = scan_path.with_name(f"{subject}_space-T2S_sim.json")
    if sim_json.is_file():
        vessel_points = []
        for obj in json.loads(sim_json.read_text())["objects"]:
            if obj["type"] == "cmb":
                continue
            points = [(obj["centre_mm"], obj["type"])]
            vessel_points += [(p, f"{obj['type']}_end") for p in obj.get("ends_mm", [])]
            vessel_points += [(p, f"{obj['type']}_bend") for p in obj.get("bends_mm", [])]
            if "crossing_mm" in obj:
                vessel_points.append((obj["crossing_mm"], f"{obj['type']}_crossing"))
            sites += _mimic_sites(pre, points)
        if len(vessel_points) > VESSEL_POINTS:
            chosen = rng.choice(len(vessel_points), size=VESSEL_POINTS, replace=False)
            vessel_points = [vessel_points[i] for i in sorted(chosen)]
        sites += _mimic_sites(pre, vessel_points, avoid=lesion_zone)
    if miner is not None:
        sites += mined_sites(miner, volume, pre.foreground, lesion_zone, mined_per_case)
    if not sites:
        return []
    centres = [site[0] for site in sites]
    volumes = extract_patches(volume, centres, CROP).astype(np.float16)
    labels = extract_patches(label.astype(np.uint8), centres, CROP).astype(np.uint8)
    return [Crop(v, lab, kind, subject, meta) for v, lab, (_, kind, meta) in zip(volumes, labels, sites)]


def _mimic_sites(pre, points, avoid=None) -> list:
    """("mimic") sites at world points inside the brain, except where `avoid` is set (vessel points next to a
    microbleed: a crop there would teach that the microbleed is background)."""
    sites = []
    for point, kind in points:
        centre = np.round(pre.world_to_voxel(point)).astype(int)
        if np.all(centre >= 0) and np.all(centre < pre.array.shape) and pre.foreground[tuple(centre)]:
            if avoid is None or not avoid[tuple(centre)]:
                sites.append((centre, "mimic", {"type": kind}))
    return sites


def augment(crop: Crop, patch_size, rng: np.random.Generator, augmentation: bool = True):
    """A (volume, label) pair of `patch_size` from a crop: shifted, turned and flipped when augmenting."""
    volume = crop.volume.astype(np.float32)
    label = crop.label
    if augmentation:
        angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
        if abs(angle) > 0.5:
            volume = ndimage.rotate(volume, angle, axes=(1, 2), reshape=False, order=1, mode="constant")
            label = ndimage.rotate(label, angle, axes=(1, 2), reshape=False, order=0, mode="constant")
        if rng.random() < 0.5:
            volume, label = volume[:, :, ::-1], label[:, :, ::-1]
        shift = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=3)
    else:
        shift = np.zeros(3, int)
    start = (np.array(CROP) - np.array(patch_size)) // 2 + shift
    sl = tuple(slice(s, s + n) for s, n in zip(start, patch_size))
    return np.ascontiguousarray(volume[sl]), np.ascontiguousarray(label[sl])


def draw_batch(pools: dict[str, list[Crop]], proportions: dict[str, float], count: int, patch_size,
               rng: np.random.Generator, augmentation: bool = True):
    """`count` samples in the given proportions of pools: (N, 1, *patch) volumes, (N,) classes, (N, *patch) labels."""
    kinds = [k for k in proportions if pools.get(k)]
    weights = np.array([proportions[k] for k in kinds], float)
    chosen = rng.choice(len(kinds), size=count, p=weights / weights.sum())
    volumes = np.empty((count, 1, *patch_size), np.float32)
    labels = np.empty((count, *patch_size), np.uint8)
    classes = np.empty(count, np.int64)
    for i, k in enumerate(chosen):
        pool = pools[kinds[k]]
        crop = pool[rng.integers(len(pool))]
        volumes[i, 0], labels[i] = augment(crop, patch_size, rng, augmentation)
        classes[i] = int(kinds[k] == "positive")
    return volumes, classes, labels
