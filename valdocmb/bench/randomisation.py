"""Domain randomisation, measured: weights retrained on the randomised simulator against the shipped ones, on the
in-distribution hold-out and on an out-of-distribution hold-out made with settings never used in training.

    python -m valdocmb.bench.randomisation --out runs/randomisation [--weights weights] [--device cuda] [--jobs 16]
                                           [--train-cases 32] [--ood-cases 40] [--holdout-cases 20]
    python -m valdocmb.bench.randomisation --out runs/randomisation --report-only

Steps, each with the product's own commands (logs under OUT/logs, times in OUT/summary.json), each resuming:
1. `valdocmb-synth`: `--profile randomised --seed 21` (training), `--profile ood --seed 23` (the out-of-distribution
   hold-out: an anatomy source, a vein model, a deep-grey iron range and a bias range that training never sees,
   `simulate.OOD_HELD_OUT`) and `--seed 2` (the first cases of the in-distribution hold-out, data/holdout).
2. `valdocmb-train --init WEIGHTS` on the randomised scans: fine-tuning with mimic crops at vessel ends, bends and
   crossings and with the parent's false positives mined on the whole randomised scans; meanwhile the parent
   scores both hold-outs (`valdocmb-stagewise --cache`).
3. The new weights score both hold-outs.
4. The report (also `--report-only`, on the cached records): per hold-out, weights and grid, the pooled VALDO
   figures with a cross-fitted lesion rule (each case scored with the rule chosen on the other folds of its own
   hold-out, as `valdocmb-tune` does) and with each weights' stored rule, and the false positives split by what
   the simulator put there (`false_positive_causes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..core.imageio import write_text_atomic
from ..core.lesion_rule import LesionRule, rule_from_manifest
from ..core.logs import setup_logging
from ..core.weights import default_weights_dir
from ..evaluate.scoring import pooled, score_components
from ..train.tune import cross_fit, load_records
from .jobs import hardware, python, run_all, run_beside, scoring_sets, synthesis

HOLD_OUTS = ("ood", "holdout")
CAUSE_MARGIN_MM = 3.0   # a false positive this close to an object's surface is put down to that object


def synth_sets(train_cases: int, ood_cases: int, holdout_cases: int) -> dict[str, list[str]]:
    return {
        "train": ["--profile", "randomised", "--seed", "21", "--cases", str(train_cases)],
        "ood": ["--profile", "ood", "--seed", "23", "--cases", str(ood_cases)],
        "holdout": ["--seed", "2", "--cases", str(holdout_cases)],
    }


# -- what a false positive sits on -------------------------------------------------------------------------------
def _segment_distance(point: np.ndarray, start, end) -> float:
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    t = np.clip(np.dot(point - start, axis) / max(float(np.dot(axis, axis)), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(point - (start + t * axis)))


def object_distance(obj: dict, point) -> float:
    """Distance (mm) from `point` (world x, y, z) to the surface of a simulated object of a sim.json."""
    point = np.asarray(point, float)
    radius = obj["core_diameter_mm"] / 2
    if obj.get("segments_mm"):
        axis = min(_segment_distance(point, a, b) for a, b in obj["segments_mm"])
    elif len(obj.get("ends_mm", [])) == 2 and obj["type"] == "vein":
        axis = _segment_distance(point, *obj["ends_mm"])
    else:
        axis = float(np.linalg.norm(point - np.asarray(obj["centre_mm"], float)))
    return max(0.0, axis - radius)


def cause_of(point, objects: list[dict], margin_mm: float = CAUSE_MARGIN_MM) -> str:
    """"vein", "calcification", "flow_void", "unrated_cmb" (a simulated microbleed too faint to be labelled) or
    "other" (tissue, air-tissue interfaces, edges, noise): the nearest object within `margin_mm` of its surface."""
    best, cause = margin_mm, "other"
    for obj in objects:
        distance = object_distance(obj, point)
        if distance <= best:
            best, cause = distance, ("unrated_cmb" if obj["type"] == "cmb" else obj["type"])
    return cause


def false_positive_causes(record: dict, kept: list[bool], objects: list[dict]) -> dict[str, int]:
    """Counts of the kept components that claim no reference microbleed, by `cause_of` their centre."""
    counts: dict[str, int] = {}
    for component, lesion, keep in zip(record["evidence"]["components"], record["lesions"], kept):
        if keep and component["claim"] is None:
            point = (lesion["world_x_mm"], lesion["world_y_mm"], lesion["world_z_mm"])
            cause = cause_of(point, objects)
            counts[cause] = counts.get(cause, 0) + 1
    return counts


# -- figures ------------------------------------------------------------------------------------------------------
def figures_by_grid(records, scores, kept_lists, objects_of) -> dict:
    out = {}
    grids = sorted({r["grid"] for r in records})
    for grid in grids + ["all"]:
        chosen = [i for i, r in enumerate(records) if grid == "all" or r["grid"] == grid]
        causes: dict[str, int] = {}
        for i in chosen:
            for cause, n in false_positive_causes(records[i], kept_lists[i], objects_of(records[i])).items():
                causes[cause] = causes.get(cause, 0) + n
        figures = pooled([scores[i] for i in chosen])
        candidates = [records[i]["candidates"] for i in chosen if "candidates" in records[i]]
        out[grid] = {"cases": len(chosen), **{k: figures[k] for k in ("tp", "fp", "fn", "sensitivity",
                                                                          "fp_per_scan", "f1")},
                     "fp_per_scan_by_cause": {k: v / max(1, len(chosen)) for k, v in sorted(causes.items())},
                     "seconds_per_case": float(np.mean([records[i]["seconds"] for i in chosen])),
                     # screening candidates; None for records made before stagewise kept the count
                     "candidates_per_scan": float(np.mean(candidates)) if candidates else None}
    return out


def simulated_objects(data: Path):
    """record -> the objects the simulator put in its scan (from the sim.json files of `data`)."""
    sims = {p.name.split("_")[0]: json.loads(p.read_text())["objects"] for p in data.glob("sub-*_sim.json")}
    return lambda record: sims.get(record["subject"], [])


def rule_figures(records: list[dict], rule: LesionRule, objects_of) -> dict:
    """Per grid, every case scored with one lesion rule, and the rule."""
    kept = [[rule.keeps(lesion) for lesion in r["lesion_objects"]] for r in records]
    scores = [score_components(r["evidence"], k, r["subject"]) for r, k in zip(records, kept)]
    return {"rule": asdict(rule), **figures_by_grid(records, scores, kept, objects_of)}


def hold_out_figures(cache: Path, data: Path, weights: Path, folds: int = 5, min_sensitivity: float = 0.9,
                     subjects: set | None = None, rules: dict[str, LesionRule] | None = None) -> dict:
    """Per grid: cross-fitted lesion rule (folds of this hold-out), the weights' stored rule and each of `rules`
    (under its name); only `subjects` when given."""
    records = [r for r in load_records(cache) if subjects is None or r["subject"] in subjects]
    objects_of = simulated_objects(data)
    scores, chosen = cross_fit(records, folds, min_sensitivity)
    rule_of_fold = {s: fold["rule"] for fold in chosen for s in fold["scored"]}
    kept_cross = [[LesionRule(**rule_of_fold[r["subject"]]).keeps(lesion) for lesion in r["lesion_objects"]]
                  for r in records]
    return {"cross_fitted": figures_by_grid(records, scores, kept_cross, objects_of),
            "cross_fitted_rules": chosen,
            "stored_rule": rule_figures(records, rule_from_manifest(weights), objects_of),
            **{name: rule_figures(records, rule, objects_of) for name, rule in (rules or {}).items()}}


def common_subjects(caches) -> set[str]:
    """The cases every cache has scored (so that rows of different weights compare alike)."""
    scored = [{p.stem for p in Path(cache).glob("sub-*.json")} for cache in caches]
    return set.intersection(*scored) if scored else set()


TABLE_HEAD = ("| hold-out | grid | weights | cases | sensitivity (TP/CMBs) | FP/scan | F1 | FP/scan: vein, calc., "
              "flow void, unrated CMB, other |")
TABLE_CAUSES = ("vein", "calcification", "flow_void", "unrated_cmb", "other")


def table_rows(result: dict, hold_outs, weights):
    """(figures entry, grid, the row's cells up to the causes) per hold-out, grid ("all" last) and weights."""
    for held in hold_outs:
        grids = sorted({g for key, r in result.items() if key.endswith(held) for g in r["cross_fitted"]},
                       key=lambda g: (g == "all", g))
        for grid in grids:
            for name in weights:
                r = result.get(f"{name}_{held}")
                if not r or grid not in r["cross_fitted"]:
                    continue
                c = r["cross_fitted"][grid]
                causes = ", ".join(f"{c['fp_per_scan_by_cause'].get(k, 0):.2f}" for k in TABLE_CAUSES)
                yield r, grid, (f"| {held} | {grid} | {name} | {c['cases']} | {c['sensitivity']:.2f} "
                                f"({c['tp']}/{c['tp'] + c['fn']}) | {c['fp_per_scan']:.2f} | {c['f1']:.2f} | "
                                f"{causes} |")


def report(out: Path, weights: dict[str, Path]) -> dict:
    """Both weights on each hold-out, on the cases every weights has scored (so that the rows compare alike)."""
    result = {}
    for name in HOLD_OUTS:
        caches = {which: out / "scores" / f"{which}-{name}" for which in weights}
        common = common_subjects(caches.values())
        if not common:
            continue
        for which, folder in weights.items():
            result[f"{which}_{name}"] = hold_out_figures(caches[which], out / "data" / name, folder,
                                                         subjects=common)
    lines = [f"{TABLE_HEAD} stored rule: sens., FP/scan |", "|" + "---|" * 9]
    for r, grid, cells in table_rows(result, HOLD_OUTS, weights):
        s = r["stored_rule"][grid]
        lines.append(f"{cells} {s['sensitivity']:.2f}, {s['fp_per_scan']:.2f} |")
    table = "\n".join(lines)
    write_text_atomic(table + "\n", out / "report.md")
    write_text_atomic(json.dumps(result, indent=1, default=float).replace("NaN", "null"), out / "report.json")
    print(table)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.bench.randomisation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None, help="the parent weights (default: shipped)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="processes at a time")
    parser.add_argument("--grid", default="mix", help="valdocmb-synth --grid for every set")
    parser.add_argument("--train-cases", type=int, default=32)
    parser.add_argument("--ood-cases", type=int, default=40)
    parser.add_argument("--holdout-cases", type=int, default=20)
    parser.add_argument("--train-set", action="append", default=[], metavar="NAME=VALUE",
                        help="valdocmb-train --set for the retraining (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="only the report, from the cached records")
    args = parser.parse_args(argv)
    setup_logging()
    parent = args.weights or default_weights_dir()
    data, logs, new = args.out / "data", args.out / "logs", args.out / "new"
    weights = {"shipped": parent, "new": new}
    if args.report_only:
        report(args.out, weights)
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    sets = synth_sets(args.train_cases, args.ood_cases, args.holdout_cases)
    run_all(synthesis(sets, data, args.jobs, "--grid", args.grid), logs, len(sets))
    seconds["synth"] = time.perf_counter() - started

    started = time.perf_counter()
    scores = args.out / "scores"
    parent_scoring = scoring_sets(parent, HOLD_OUTS, data, scores, "shipped", args.device, max(1, args.jobs // 8))
    train_set = [item for pair in (("--set", s) for s in args.train_set) for item in pair]
    training = {} if (new / "MANIFEST.json").is_file() else {"train": python(
        "valdocmb.train", "--data", str(data / "train"), "--init", str(parent), "--out", str(new),
        "--work", str(args.out / "work"), "--device", args.device, "--workers", str(max(1, args.jobs // 2)),
        *train_set)}
    seconds["training"] = run_beside(training, parent_scoring, logs)
    seconds["training_and_parent_scoring"] = time.perf_counter() - started

    started = time.perf_counter()
    run_all(scoring_sets(new, HOLD_OUTS, data, scores, "new", args.device, max(1, args.jobs // 4)), logs, args.jobs)
    seconds["new_scoring"] = time.perf_counter() - started
    summary = {"sets": {k: " ".join(v) for k, v in sets.items()}, "seconds": {k: round(v) for k, v in seconds.items()},
               "hardware": hardware()}
    write_text_atomic(json.dumps(summary, indent=1), args.out / "summary.json")
    report(args.out, weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
