"""Weight sets side by side on the same cases, with the decision rule written down before any scoring.

    python -m valdocmb.bench.weights_eval --out runs/weights-eval \\
        --weights shipped=weights --weights randomised=weights/randomised \\
        --weights new=~/.cache/valdocmb/weights-stream --candidate new [--device auto] [--jobs 2]
        [--batch-norm-scan NAME] [--int8 NAME]
        [--holdout-cases 50] [--ood-cases 40] [--tuning-cases 20] [--score-sets holdout ood tuning]
    python -m valdocmb.bench.weights_eval --out runs/weights-eval --weights ... --report-only [--record-budget]

Three simulated sets, each made once with the product's own commands and never used in training:
- `holdout`: the in-distribution hold-out (`valdocmb-synth --seed 2`, the standard profile, all five grids);
- `ood`: the out-of-distribution hold-out (`--profile ood --seed 23`: an anatomy source, a vein model, a deep-grey
  iron range and a bias range that training never sees, `simulate.OOD_HELD_OUT`);
- `tuning`: where a lesion rule for new weights is chosen (`--seed 31`), apart from every reported case.
Every weight set scores every set (`valdocmb-stagewise --cache`, resumable, one record per case). The report gives,
per hold-out, grid and weights, the official VALDO figures with the lesion rule cross-fitted on the hold-out's own
folds (as `valdocmb-tune` does) and with the rule chosen on the tuning set, false positives by what the simulator
put there, and seconds per case. It ends with the decisions, by the rules below: DECISION_RULE (which weights),
BUDGET_RULE (a candidate cap) and INT8_RULE (int8 arms).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..core import manifest
from ..core.imageio import write_text_atomic
from ..core.lesion_rule import LesionRule
from ..core.logs import setup_logging
from ..train.stagewise import RANK_DISTANCE_MM, candidate_budget, smallest_lossless_budget
from ..train.tune import choose_rule, load_records
from .jobs import hardware, run_all, scoring_sets, synthesis
from .randomisation import TABLE_HEAD, common_subjects, hold_out_figures, table_rows

REPORTED = ("holdout", "ood")
TUNING = "tuning"
MIN_SENSITIVITY = 0.9  # the tuning set's rule: highest pooled F1 among rules keeping this sensitivity
# Written before any scoring (issue 31): the candidate becomes the default when, with the lesion rule cross-fitted,
# its OOD F1 over all grids beats the shipped weights' and its in-distribution sensitivity is at most 0.02 lower.
DECISION_RULE = ("candidate default iff F1(candidate, ood, all) > F1(shipped, ood, all) and "
                 "sensitivity(candidate, holdout, all) >= sensitivity(shipped, holdout, all) - 0.02 "
                 "(lesion rule cross-fitted)")
# Written before any int8 arm was scored (issue 36): int8 becomes the default precision for a weight set when, on
# each hold-out over all grids (lesion rule cross-fitted), it finds at least the microbleeds bfloat16 finds and adds
# at most 0.05 false positives per scan.
INT8_RULE = ("int8 default iff, on each hold-out (all grids, lesion rule cross-fitted), sensitivity(int8) >= "
             "sensitivity(bfloat16) and FP/scan(int8) <= FP/scan(bfloat16) + 0.05")
# Written before the retrained weights were scored (issue 36: a candidate budget). A cap below the default 2,000
# only drops the lowest-ranked candidates, so it can lose microbleeds and never find new ones: it is chosen on the
# tuning set and kept only where no hold-out loses a microbleed to it.
BUDGET_RULE = ("K = the smallest cap of candidates per scan in (250, 500, 750, 1000, 1500, 2000) that holds (a "
               "candidate within 3 mm) every tuning-set microbleed the 2,000 cap holds; K becomes the candidate's "
               "max_candidates iff K < 2000 and, on each hold-out (all grids), K holds every microbleed the 2,000 "
               "cap holds")


def sets(holdout_cases: int, ood_cases: int, tuning_cases: int) -> dict[str, list[str]]:
    return {"holdout": ["--seed", "2", "--cases", str(holdout_cases)],
            "ood": ["--profile", "ood", "--seed", "23", "--cases", str(ood_cases)],
            "tuning": ["--seed", "31", "--cases", str(tuning_cases)]}


def named_folders(items: list[str]) -> dict[str, Path]:
    folders = {}
    for item in items:
        name, _, folder = item.partition("=")
        if not name or not folder:
            raise SystemExit(f"--weights {item!r}: expected NAME=FOLDER")
        folders[name] = Path(folder).expanduser()
    return folders


def tuning_rule(scores: Path, name: str) -> LesionRule | None:
    records = load_records(scores / f"{name}-{TUNING}")
    return choose_rule(records, MIN_SENSITIVITY) if records else None


def decide(result: dict, candidate: str | None) -> str:
    if not candidate or candidate == "shipped":
        return "no candidate named (--candidate): no decision"
    try:
        ood = {w: result[f"{w}_ood"]["cross_fitted"]["all"] for w in ("shipped", candidate)}
        ind = {w: result[f"{w}_holdout"]["cross_fitted"]["all"] for w in ("shipped", candidate)}
    except KeyError:
        return "not every weight set has scored both hold-outs yet: no decision"
    compared = [ood[w]["f1"] for w in ood] + [ind[w]["sensitivity"] for w in ind]
    if any(value is None or math.isnan(value) for value in compared):
        return "a figure is undefined (a hold-out without microbleeds, or nothing found): no decision"
    wins = ood[candidate]["f1"] > ood["shipped"]["f1"]
    keeps = ind[candidate]["sensitivity"] >= ind["shipped"]["sensitivity"] - 0.02
    verdict = "becomes the default" if wins and keeps else "does not become the default"
    return (f"{candidate} {verdict}: OOD F1 {ood[candidate]['f1']:.3f} vs shipped {ood['shipped']['f1']:.3f} "
            f"({'higher' if wins else 'not higher'}); in-distribution sensitivity {ind[candidate]['sensitivity']:.3f}"
            f" vs shipped {ind['shipped']['sensitivity']:.3f} ({'within' if keeps else 'more than'} 0.02 lower)")


def decide_int8(result: dict, int8: str, base: str) -> str:
    """INT8_RULE for the weight set `int8` (scored with --precision int8) against `base` (the same folder)."""
    try:
        pairs = {held: tuple(result[f"{name}_{held}"]["cross_fitted"]["all"] for name in (int8, base))
                 for held in REPORTED}
    except KeyError:
        return f"{int8}: not scored on both hold-outs yet: no decision"
    if any(value is None or math.isnan(value) for a, b in pairs.values()
           for value in (a["sensitivity"], b["sensitivity"], a["fp_per_scan"], b["fp_per_scan"])):
        return f"{int8}: a figure is undefined: no decision"
    passes = all(a["sensitivity"] >= b["sensitivity"] and a["fp_per_scan"] <= b["fp_per_scan"] + 0.05
                 for a, b in pairs.values())
    figures = "; ".join(f"{held}: sensitivity {a['sensitivity']:.3f} vs {b['sensitivity']:.3f}, FP/scan "
                        f"{a['fp_per_scan']:.2f} vs {b['fp_per_scan']:.2f}" for held, (a, b) in pairs.items())
    return f"int8 {'becomes' if passes else 'does not become'} the default for {base} ({figures})"


def budget_rows(scores: Path, weights: dict[str, Path]) -> dict[str, list[dict]]:
    """`stagewise.candidate_budget` of every weight set on every scored set (issue 36: a candidate budget)."""
    return {f"{name}_{held}": candidate_budget(load_records(scores / f"{name}-{held}"))
            for name in weights for held in (*REPORTED, TUNING) if (scores / f"{name}-{held}").is_dir()}


def budget_table(budgets: dict[str, list[dict]]) -> list[str]:
    if not any(rows and rows[0]["microbleeds"] for rows in budgets.values()):
        return ["Candidate budget: no scored case records screening ranks."]
    caps = [row["budget"] for row in next(iter(budgets.values()))]
    lines = [f"Candidate budget: microbleeds screening holds (a candidate within {RANK_DISTANCE_MM:g} mm) under a "
             "cap of K candidates per scan, and candidates per scan then",
             "| weights, set | cases | microbleeds | " + " | ".join(f"K={k}" for k in caps) + " |",
             "|" + "---|" * (3 + len(caps))]
    for name, rows in budgets.items():
        if rows and rows[0]["microbleeds"]:
            cells = " | ".join(f"{r['held']} ({r['candidates_per_scan']:.0f})" for r in rows)
            lines.append(f"| {name} | {rows[0]['cases']} | {rows[0]['microbleeds']} | {cells} |")
    return lines


def decide_budget(budgets: dict[str, list[dict]], candidate: str | None) -> dict:
    """BUDGET_RULE for the candidate weights: {"max_candidates": K or None, "verdict": text}."""
    tuning = budgets.get(f"{candidate}_{TUNING}", []) if candidate else []
    chosen = smallest_lossless_budget(tuning)
    if chosen is None:
        return {"max_candidates": None, "verdict": "no decision (no tuning-set microbleeds with screening ranks)"}
    if chosen >= max(row["budget"] for row in tuning):
        return {"max_candidates": None, "verdict": f"the tuning set needs the {chosen} cap: no budget"}
    losses = []
    for held in REPORTED:
        rows = {row["budget"]: row for row in budgets.get(f"{candidate}_{held}", [])}
        if not rows or not rows[chosen]["microbleeds"]:
            return {"max_candidates": None, "verdict": f"no decision (no {held} microbleeds with screening ranks)"}
        held_by_all = rows[max(rows)]["held"]
        if lost := held_by_all - rows[chosen]["held"]:
            losses.append(f"{held} loses {lost} of {held_by_all}")
    if losses:
        return {"max_candidates": None, "verdict": f"K = {chosen} on the tuning set, not kept: {', '.join(losses)}"}
    return {"max_candidates": chosen,
            "verdict": f"K = {chosen} on the tuning set becomes {candidate}'s max_candidates: no hold-out loses a "
                       "microbleed to it"}


def record_budget(folder: Path, budget: dict, budgets: dict[str, list[dict]], candidate: str) -> None:
    """Store an adopted budget in the weights' manifest, for these weights only (ThreeStage.from_weights reads it)."""
    from ..core.three_stage import BUDGET_KEY, weights_version  # torch: imported once --help is past

    entry = {"weights": weights_version(folder), "max_candidates": budget["max_candidates"], "rule": BUDGET_RULE,
             "verdict": budget["verdict"],
             "evidence": {held: budgets[f"{candidate}_{held}"] for held in (*REPORTED, TUNING)}}
    manifest.update(folder, lambda content: content.update({BUDGET_KEY: entry}))
    print(f"candidate budget {budget['max_candidates']} recorded in {manifest.manifest_path(folder)}")


def training_summary(folder: Path) -> dict:
    """How a weight set was trained, from its manifest: schedule, hardware, hours, and items seen per stage
    (streamed runs count every training step's positions, windows or patches; pool runs iterations x samples)."""
    from ..core.three_stage import WEIGHT_FILES  # torch: imported once --help is past

    files = manifest.read(folder)["files"]
    entries = {stage: files.get(relative) or {} for stage, relative in WEIGHT_FILES.items()}
    meta = entries["screening"].get("training") or {}
    detail = meta.get("schedule_detail") or {}
    seen: dict[str, str] = {}
    for stage, entry in entries.items():
        curve = entry.get("learning_curve") or {}
        if curve.get("items_seen"):
            seen[stage] = f"{curve['items_seen']:,} {curve.get('unit') or 'items'}"
        elif f"{stage}_iterations" in detail:
            seen[stage] = f"{detail[f'{stage}_iterations'] * detail[f'{stage}_samples']:,} samples"
        else:
            seen[stage] = "n/a"
    seconds = sum((meta.get("training_s") or {}).values()) or meta.get("wall_time_s")
    schedule = str(meta.get("schedule", "n/a")) + (" (fine-tuned)" if meta.get("parent") else "")
    return {"schedule": schedule, "hardware": meta.get("hardware", "n/a"),
            "hours": round(float(seconds) / 3600, 2) if seconds else None, "seen": seen}


def training_table(summaries: dict[str, dict]) -> list[str]:
    """`training_summary` of every weight set, as a table."""
    lines = ["How each weight set was trained (hours: a streamed run's training steps, without validation and "
             "resumes; a pool run's training process; seen: what each stage's steps saw, in its own unit)",
             "| weights | schedule | hardware | hours | screening seen | discrimination seen | U-Net seen |",
             "|" + "---|" * 7]
    for name, t in summaries.items():
        hours = "n/a" if t["hours"] is None else f"{t['hours']:.2f}"
        lines.append(f"| {name} | {t['schedule']} | {t['hardware']} | {hours} | " + " | ".join(t["seen"].values())
                     + " |")
    return lines


def report(out: Path, weights: dict[str, Path], candidate: str | None, int8: dict[str, str] | None = None) -> dict:
    """Every weight set on the cases all of them have scored, per hold-out and grid; returns report.json's record."""
    scores, data = out / "scores", out / "data"
    result: dict = {}
    rules = {name: tuning_rule(scores, name) for name in weights}
    for held in REPORTED:
        common = common_subjects(scores / f"{name}-{held}" for name in weights)
        if not common:
            continue
        for name, folder in weights.items():
            rule = rules[name]
            result[f"{name}_{held}"] = hold_out_figures(scores / f"{name}-{held}", data / held, folder,
                                                        subjects=common,
                                                        rules={"tuning_rule": rule} if rule is not None else None)
    lines = [f"{TABLE_HEAD} tuning-set rule: sens., FP/scan, F1 | s/case | candidates/scan |", "|" + "---|" * 11]
    for r, grid, cells in table_rows(result, REPORTED, weights):
        c, t = r["cross_fitted"][grid], r.get("tuning_rule", {}).get(grid)
        tuned = f"{t['sensitivity']:.2f}, {t['fp_per_scan']:.2f}, {t['f1']:.2f}" if t else "n/a"
        count = c["candidates_per_scan"]
        lines.append(f"{cells} {tuned} | {c['seconds_per_case']:.0f} | {'n/a' if count is None else f'{count:.0f}'} |")
    budgets = budget_rows(scores, weights)
    decision = decide(result, candidate)
    int8_decisions = [decide_int8(result, name, base) for name, base in (int8 or {}).items()]
    budget = decide_budget(budgets, candidate)
    training = {name: training_summary(folder) for name, folder in weights.items()}
    text = ("\n".join(lines) + "\n\n" + "\n".join(training_table(training)) + "\n\n" + "\n".join(budget_table(budgets))
            + f"\n\nBudget rule (fixed before scoring): {BUDGET_RULE}.\nBudget: {budget['verdict']}."
            + f"\n\nDecision rule (fixed before scoring): {DECISION_RULE}.\nDecision: {decision}.\n"
            + "".join(f"\nint8 rule (fixed before scoring): {INT8_RULE}.\nDecision: {d}.\n" for d in int8_decisions))
    write_text_atomic(text, out / "report.md")
    record = {"decision_rule": DECISION_RULE, "decision": decision, "figures": result, "candidate_budget": budgets,
              "training": training,
              "int8_rule": INT8_RULE, "int8_decisions": int8_decisions, "budget_rule": BUDGET_RULE,
              "budget": budget}
    write_text_atomic(json.dumps(record, indent=1, default=float).replace("NaN", "null"), out / "report.json")
    print(text)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.bench.weights_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=FOLDER",
                        help="a weight set to score (repeatable; one must be named shipped)")
    parser.add_argument("--batch-norm-scan", action="append", default=[], metavar="NAME",
                        help="score the weight set NAME with its batch norms corrected on each scan "
                        "(`--batch-norm scan`; name the same folder twice to compare, e.g. --weights shipped=weights "
                        "--weights shipped-scan=weights --batch-norm-scan shipped-scan)")
    parser.add_argument("--int8", action="append", default=[], metavar="NAME",
                        help="score the weight set NAME with --precision int8 (OpenVINO, CPU; the weights need their "
                        "int8 calibration) and decide by INT8_RULE against the set naming the same folder without it")
    parser.add_argument("--candidate", default=None, help="the weight set the decision rule is about")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="processes at a time")
    parser.add_argument("--holdout-cases", type=int, default=50)
    parser.add_argument("--ood-cases", type=int, default=40)
    parser.add_argument("--tuning-cases", type=int, default=20)
    parser.add_argument("--score-sets", nargs="+", choices=(*REPORTED, TUNING), default=[*REPORTED, TUNING],
                        help="the sets the weights are scored on (default all; an ablation arm may skip the tuning "
                        "set, its figures then cross-fitted only)")
    parser.add_argument("--report-only", action="store_true", help="only the report, from the cached records")
    parser.add_argument("--record-budget", action="store_true",
                        help="with --report-only: store the candidate budget in the candidate's MANIFEST.json when "
                        "BUDGET_RULE adopts one (as `valdocmb-tune --record` stores the lesion rule)")
    args = parser.parse_args(argv)
    setup_logging()
    weights = named_folders(args.weights) or {"shipped": Path("weights"), "randomised": Path("weights/randomised")}
    if "shipped" not in weights:
        parser.error("name one weight set shipped (the current default), e.g. --weights shipped=weights")
    if unknown := set(args.batch_norm_scan) - set(weights):
        parser.error(f"--batch-norm-scan {', '.join(sorted(unknown))}: not a named weight set")
    int8 = {}
    for name in args.int8:
        bases = [b for b, folder in weights.items() if folder == weights.get(name) and b != name
                 and b not in args.int8 and b not in args.batch_norm_scan]
        if name not in weights or not bases:
            parser.error(f"--int8 {name}: name a weight set, and another one on the same folder without int8")
        int8[name] = bases[0]
    if args.record_budget and not (args.report_only and args.candidate):
        parser.error("--record-budget needs --report-only and --candidate")
    if args.report_only:
        record = report(args.out, weights, args.candidate, int8)
        if args.record_budget:
            if record["budget"]["max_candidates"] is None:
                print(f"no candidate budget recorded: {record['budget']['verdict']}")
            else:
                record_budget(weights[args.candidate], record["budget"], record["candidate_budget"], args.candidate)
        return 0
    logs, data, scores = args.out / "logs", args.out / "data", args.out / "scores"
    logs.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    made = {name: arguments for name, arguments in sets(args.holdout_cases, args.ood_cases, args.tuning_cases).items()
            if name in args.score_sets}
    run_all(synthesis(made, data, args.jobs), logs, len(made))
    seconds["synth"] = time.perf_counter() - started
    for name, folder in weights.items():  # one weight set at a time: its processes share the CPUs or the GPU
        started = time.perf_counter()
        extra = (("--batch-norm", "scan") if name in args.batch_norm_scan else ()) + \
            (("--precision", "int8") if name in int8 else ())
        run_all(scoring_sets(folder, args.score_sets, data, scores, name, args.device, max(1, args.jobs), extra),
                logs, args.jobs)
        seconds[f"scoring_{name}"] = time.perf_counter() - started
    summary = {"sets": {k: " ".join(v) for k, v in made.items()}, "weights": {k: str(v) for k, v in weights.items()},
               "seconds": {k: round(v) for k, v in seconds.items()}, "hardware": hardware(),
               "mean_seconds_per_case": {name: float(np.mean([r["seconds"] for held in REPORTED
                                                              for r in load_records(scores / f"{name}-{held}")] or [0]))
                                         for name in weights}}
    write_text_atomic(json.dumps(summary, indent=1), args.out / "summary.json")
    report(args.out, weights, args.candidate, int8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
