"""How well `valdocmb.core.location` places microbleeds: registration + atlas labelling against the simulator's truth.

    python -m valdocmb.bench.location --data DIR [DIR ...] [--json FILE]

For every simulated case (a scan with its *_sim.json), the truth is the atlas label at each visible microbleed's
true MNI position (the simulator's subject-to-MNI transform, recorded as `mni_ras_mm`, or replayed from the case's
seed for cases made before it was recorded); the prediction is the atlas label where our registration maps the
microbleed's centre. Every third case is re-stored in another voxel order (axes permuted and flipped, the physical
positions unchanged) and every third in a flipped one, so odd orientations are part of the test. Prints agreement of
MARS class, region and side with confusion tables, and registration seconds per case and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.imageio import read_scan
from ..core.layouts import VALDO_T2S
from ..core.location import MARS_CLASSES, UNKNOWN, load_atlas, region_at, register
from ..core.logs import setup_logging


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


def reoriented(image: sitk.Image, index: int) -> tuple[sitk.Image, str]:
    """The same scan in another voxel order (physical positions kept) for two cases in three."""
    if index % 3 == 1:
        return sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [True, False, False]), "permuted (y,z,x), x flipped"
    if index % 3 == 2:
        return sitk.Flip(image, [False, True, True]), "y and z flipped"
    return image, "as stored"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.bench.location", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    atlas = load_atlas()
    scans = sorted(p for folder in args.data for p in folder.iterdir() if VALDO_T2S.match(p.name))
    mars: Counter = Counter()
    regions: Counter = Counter()
    sides: Counter = Counter()
    cases, seconds = [], []
    for i, scan_path in enumerate(scans):
        matched = VALDO_T2S.match(scan_path.name)
        assert matched is not None  # the scans were chosen by this pattern
        subject = matched.group(1)
        sim = json.loads(scan_path.with_name(f"{subject}_space-T2S_sim.json").read_text())
        truth_points = true_mni_ras(sim)
        if truth_points is None:
            print(f"{subject}: the replayed anatomy differs from the recorded one; skipped", file=sys.stderr)
            continue
        image, orientation = reoriented(read_scan(scan_path), i)
        start = time.perf_counter()
        placement = register(image)
        seconds.append(time.perf_counter() - start)
        cmbs = [o for o in sim["objects"] if o["type"] == "cmb" and o.get("visible")]
        rows = []
        for cmb, ras in zip(cmbs, truth_points):
            truth = region_at((-ras[0], -ras[1], ras[2]), atlas)
            if placement.transform is None:
                found = {"region": UNKNOWN, "mars_class": UNKNOWN, "side": UNKNOWN}
            else:
                found = region_at(placement.transform.TransformPoint(cmb["centre_mm"]), atlas)
            mars[(truth["mars_class"], found["mars_class"])] += 1
            regions[(truth["region"], found["region"])] += 1
            sides[(truth["side"], found["side"])] += 1
            rows.append({"truth": truth, "found": found})
        cases.append({"subject": str(scan_path.parent.name) + "/" + subject, "grid": sim["acquisition"]["grid"],
                      "orientation": orientation, **placement.record(), "microbleeds": rows})
        print(f"{subject} {sim['acquisition']['grid']:7} {orientation:28} {placement.record()['status'][:60]:60} "
              f"overlap {placement.brain_overlap or 0:.3f}  {seconds[-1]:5.1f} s  "
              f"{sum(r['truth']['mars_class'] == r['found']['mars_class'] for r in rows)}/{len(rows)} MARS",
              file=sys.stderr)

    def agreement(table: Counter) -> float:
        total = sum(table.values())
        return sum(n for (t, f), n in table.items() if t == f) / total if total else float("nan")

    summary = {
        "cases": len(cases), "microbleeds": sum(mars.values()),
        "mars_agreement": agreement(mars), "region_agreement": agreement(regions), "side_agreement": agreement(sides),
        "registration_failed": sum(c["status"] != "ok" for c in cases),
        "seconds_per_case": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))} if seconds else None,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mars_confusion": {f"{t} -> {f}": n for (t, f), n in sorted(mars.items())},
        "region_confusion": {f"{t} -> {f}": n for (t, f), n in sorted(regions.items())},
    }
    labels = [*MARS_CLASSES, UNKNOWN]
    print(f"\n{len(cases)} cases, {summary['microbleeds']} microbleeds: MARS class {summary['mars_agreement']:.3f}, "
          f"region {summary['region_agreement']:.3f}, side {summary['side_agreement']:.3f}; "
          f"{summary['registration_failed']} registration(s) refused")
    print("truth \\ found " + " ".join(f"{c:>15}" for c in labels))
    for t in labels[:-1]:
        print(f"{t:14} " + " ".join(f"{mars[(t, f)]:15d}" for f in labels))
    if seconds:
        print(f"registration + labelling: {np.mean(seconds):.1f} s per case (max {np.max(seconds):.1f}), "
              f"peak memory {summary['peak_memory_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": cases}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
