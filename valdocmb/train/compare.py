"""Side by side on labelled scans: the three-stage pipeline, nnU-Net and their ensemble, in one run on one machine.

Each method segments every case (timed); the ensemble combines the two results already computed (its time is
their sum). Every mask is scored with the official VALDO rules. Prints per-case rows and a summary per method
(median F1 and Dice with IQR, pooled sensitivity / precision / FP per scan, seconds per case) and writes them as
JSON and CSV; --record stores the summary under "comparison" in the weights' MANIFEST.json.

  valdocmb-compare --data data/holdout --device cpu --max-cases 10 --out runs/compare
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from ..core import manifest
from ..core.defaults import NNUNET_MIRRORING, NNUNET_TILE_STEP, PRECISIONS
from ..core.ensemble import EnsembleMethod
from ..core.imageio import read_mask, read_scan, write_text_atomic
from ..core.logs import setup_logging
from ..core.methods import MethodOptions, load
from ..core.weights import default_weights_dir
from ..evaluate.scoring import CaseScore, score_case, summarize
from .samples import find_training_cases
from .stagewise import grid_of

log = logging.getLogger("valdocmb.compare")


def compare(cases, members: dict, ensemble: EnsembleMethod | None, first: int = 1, total: int | None = None
            ) -> list[dict]:
    rows = []
    for index, (subject, scan_path, label_path) in enumerate(cases, first):
        scan, reference = read_scan(scan_path), read_mask(label_path, cast=False)
        results, seconds = {}, {}
        for name, method in members.items():
            start = time.perf_counter()
            results[name] = method.segment(scan, {})
            seconds[name] = time.perf_counter() - start
        if ensemble is not None:
            start = time.perf_counter()
            results["ensemble"] = ensemble.combine(scan, results)
            seconds["ensemble"] = sum(seconds.values()) + time.perf_counter() - start
        grid = grid_of(scan_path, subject)
        for name in results:
            score = score_case(reference, results[name].mask, subject)
            rows.append({"subject": subject, "grid": grid, "method": name, "seconds": round(seconds[name], 2),
                         **asdict(score)})
        line = "  ".join(f"{r['method']} TP {r['tp']} FP {r['fp']} FN {r['fn']} ({r['seconds']:.0f} s)"
                         for r in rows[-len(results):])
        log.info("[%d/%d] %s %s: %s", index, total or len(cases), subject, grid, line)
    return rows


def summary_of(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        scores = [CaseScore(**{k: r[k] for k in CaseScore.__dataclass_fields__ if k in r}) for r in mine]
        out[name] = {**summarize(scores), "seconds_per_case": float(np.mean([r["seconds"] for r in mine]))}
    return out


def table(summary: dict) -> str:
    lines = ["| method | cases | median F1 (IQR) | median Dice (IQR) | sensitivity | precision | FP/scan | s/case |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        f1, dice, pooled = s["f1"], s["dice"], s["pooled"]
        lines.append(f"| {name} | {s['cases']} | {f1['median']:.2f} ({f1['q1']:.2f}-{f1['q3']:.2f}) | "
                     f"{dice['median']:.2f} ({dice['q1']:.2f}-{dice['q3']:.2f}) | {pooled['sensitivity']:.2f} | "
                     f"{pooled['precision']:.2f} | {pooled['fp_per_scan']:.1f} | {s['seconds_per_case']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="VALDO-layout folder with *_CMB.nii.gz labels")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--subjects", nargs="+", help="these subjects, in this order (default: all)")
    parser.add_argument("--methods", nargs="+", choices=("three-stage", "nnunet"), default=["three-stage", "nnunet"],
                        help="the ensemble is scored too when both are run")
    parser.add_argument("--tile-step", type=float, default=NNUNET_TILE_STEP, help="nnU-Net sliding-window step")
    parser.add_argument("--mirroring", action=argparse.BooleanOptionalAction, default=NNUNET_MIRRORING,
                        help="nnU-Net test-time mirroring")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="three-stage arithmetic (default auto, as the container runs it)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--record", action="store_true", help="store the summary in the weights' MANIFEST.json")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in OUT/cases.csv, run the rest")
    args = parser.parse_args(argv)
    setup_logging()
    weights = args.weights or default_weights_dir()
    cases = find_training_cases(args.data)
    if args.subjects:
        by_subject = {case[0]: case for case in cases}
        cases = [by_subject[s] for s in args.subjects if s in by_subject]
    cases = cases[: args.max_cases]
    if not cases:
        log.error("%s: no scan with a label", args.data)
        return 2
    options = MethodOptions(device=args.device, precision=args.precision,
                            nnunet={"tile_step": args.tile_step, "mirroring": args.mirroring})
    members = {name: load(name, weights, options) for name in ("three-stage", "nnunet") if name in args.methods}
    command = manifest.command_line("valdocmb-compare", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ensemble = EnsembleMethod(members) if len(members) == 2 else None
    rows = read_rows(args.out / "cases.csv") if args.resume else []
    done = {r["subject"] for r in rows}
    record: dict | None = None
    if done:
        log.info("resuming: %d case(s) already in %s", len(done), args.out / "cases.csv")
        record = write_results(rows, args, members, command)
    for number, case in enumerate(cases, 1):  # results are rewritten after every new case: readable while it runs
        if case[0] not in done:
            rows += compare([case], members, ensemble, number, len(cases))
            record = write_results(rows, args, members, command)
    assert record is not None  # there is at least one case (checked above)
    print(table(record["summary_raw"]))
    if args.record:
        comparison = {k: v for k, v in record.items() if k != "summary_raw"}
        manifest.update(weights, lambda content: content.update(comparison=comparison))
    return 0


def read_rows(path: Path) -> list[dict]:
    """Rows of an earlier run's cases.csv, with the numbers as numbers again."""
    if not path.exists():
        return []
    # the fields' annotations are strings (postponed evaluation): "int", "float" or "str"
    types = {field.name: str(field.type) for field in fields(CaseScore)}
    convert = {"int": int, "float": float, "str": str}
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            row["seconds"] = float(row["seconds"])
            rows.append({k: convert[types[k]](v) if k in types else v for k, v in row.items()})
    return rows


def write_results(rows: list[dict], args, members: dict, command: str) -> dict:
    summary = summary_of(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), args.out / "cases.csv")
    record = {"data": str(args.data), "subjects": list(dict.fromkeys(r["subject"] for r in rows)),
              "device": str(next(iter(members.values())).device),
              "nnunet": {"tile_step": args.tile_step, "mirroring": args.mirroring}, "command": command,
              "summary": json.loads(json.dumps(summary, default=float).replace("NaN", "null"))}
    write_text_atomic(json.dumps(record, indent=1), args.out / "summary.json")
    write_text_atomic(table(summary) + "\n", args.out / "summary.md")
    return {**record, "summary_raw": summary}


if __name__ == "__main__":
    sys.exit(main())
