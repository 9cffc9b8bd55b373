"""The fine-tuning demonstration: a simulated "new scanner" outside the training ranges, 20 of its scans fine-tuned
with 5-fold cross-validation, 30 more never touched, and the in-distribution hold-out before and after.

    python -m valdocmb.bench.finetune_demo --out runs/finetune_demo [--weights weights] [--device cuda]
                                           [--jobs 8] [--holdout-cases 20]

Steps, each with the product's own commands (logged under OUT/logs, timed in OUT/summary.json):
1. `valdocmb-synth`: the stand-in scanner (`STAND_IN`: 1x1x3 mm grid at 3 T, lower SNR, more veins and
   calcifications, stronger bias than any training case) as sub-001..020 (fine-tuning) and sub-021..050 (never
   touched), 12 scans of the training distribution to mix in, and the first cases of the in-distribution hold-out
   (`--seed 2`, the same cases as data/holdout).
2. `valdocmb-train --init WEIGHTS --folds 5 --mix ... --parallel`: unchanged versus fine-tuned on the same folds
   (each fold's lesion rule chosen on the other folds), then the final weights on all 20 with the rule chosen on
   every out-of-fold result. Meanwhile the unchanged weights score the untouched scans and the hold-out.
3. `valdocmb-stagewise`: the fine-tuned weights score the same two sets.
4. A table: pooled sensitivity, false positives per scan and F1 under each weights' own lesion rule (VALDO rules).
Every step resumes: scans already made, checkpoints and scores already cached are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..core.imageio import write_text_atomic
from ..core.lesion_rule import rule_from_manifest
from ..core.logs import setup_logging
from ..core.weights import default_weights_dir
from ..evaluate.scoring import pooled
from ..train.stagewise import stage_scores
from .jobs import hardware, python, run_all, run_beside, scoring_sets, synthesis

# simulator settings outside the training ranges (snr 12-40, veins 8-30, calcifications 0-3, bias 0.05-0.25)
STAND_IN = ["--grid", "alfa3", "--seed", "7", "--set", "snr=[7,11]", "--set", "veins=[35,60]",
            "--set", "calcifications=[2,5]", "--set", "bias_amplitude=[0.3,0.45]"]
SETS = {  # folder: valdocmb-synth arguments
    "new_finetune": ["--cases", "20", "--start", "1", *STAND_IN],
    "new_untouched": ["--cases", "30", "--start", "21", *STAND_IN],
    "mix": ["--cases", "12", "--seed", "11"],
}


def figures(weights: Path, cache: Path) -> dict:
    """Pooled VALDO figures of the cached records under the weights' own lesion rule."""
    rule = rule_from_manifest(weights)
    records = [json.loads(p.read_text()) for p in sorted(cache.glob("sub-*.json"))]
    scores = [stage_scores(r, rule)["lesion rule"] for r in records]
    return {**pooled(scores), "cases": len(records),
            "seconds_per_case": sum(r["seconds"] for r in records) / max(1, len(records))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.bench.finetune_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None, help="the weights to fine-tune (default: shipped)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="processes at a time")
    parser.add_argument("--holdout-cases", type=int, default=20,
                        help="how many of the in-distribution hold-out's cases (sub-001..) to score")
    parser.add_argument("--parallel-folds", type=int, default=6, help="valdocmb-train --parallel")
    args = parser.parse_args(argv)
    setup_logging()
    weights = args.weights or default_weights_dir()
    data, logs, work = args.out / "data", args.out / "logs", args.out / "work"
    logs.mkdir(parents=True, exist_ok=True)
    tuned = args.out / "finetuned"
    seconds: dict[str, float] = {}
    summary_path = args.out / "summary.json"

    started = time.perf_counter()
    sets = {**SETS, "holdout": ["--cases", str(args.holdout_cases), "--seed", "2"]}
    run_all(synthesis(sets, data, args.jobs), logs, len(sets))
    seconds["synth"] = time.perf_counter() - started

    # fine-tuning (cross-validation, then the final weights) while the unchanged weights score the other sets
    started = time.perf_counter()
    scores = args.out / "scores"
    unchanged_scoring = scoring_sets(weights, ("new_untouched", "holdout"), data, scores, "unchanged", args.device,
                                     max(1, args.jobs // 8))
    training = {} if (tuned / "MANIFEST.json").is_file() else {"train": python(
        "valdocmb.train", "--data", str(data / "new_finetune"), "--init", str(weights), "--out", str(tuned),
        "--work", str(work), "--folds", "5", "--mix", str(data / "mix"), "--mix-ratio", "0.3", "--device", args.device,
        "--workers", str(max(1, args.jobs // 2)), "--parallel", str(args.parallel_folds))}
    seconds["finetune_crossval_and_final"] = run_beside(training, unchanged_scoring, logs)
    seconds["unchanged_scoring_and_finetuning"] = time.perf_counter() - started

    started = time.perf_counter()
    run_all(scoring_sets(tuned, ("new_untouched", "holdout"), data, scores, "finetuned", args.device,
                         max(1, args.jobs // 4)), logs, args.jobs)
    seconds["finetuned_scoring"] = time.perf_counter() - started

    crossval = json.loads((work / "finetune_crossval.json").read_text())
    result = {
        "stand_in": " ".join(STAND_IN), "sets": {k: " ".join(v) for k, v in sets.items()},
        "crossval_20": {"unchanged": crossval["unchanged"], "fine_tuned": crossval["fine_tuned"],
                        "folds": crossval["table"]},
        **{f"{which}_{name}": figures(w, args.out / "scores" / f"{which}-{name}")
           for which, w in (("unchanged", weights), ("finetuned", tuned)) for name in ("new_untouched", "holdout")},
        "seconds": {k: round(v) for k, v in seconds.items()},
        "hardware": hardware(),
    }
    write_text_atomic(json.dumps(result, indent=1, default=float).replace("NaN", "null"), summary_path)
    print(f"{'':28} {'sens':>6} {'FP/scan':>8} {'F1':>6} {'cases':>6}")
    rows = [("20 new, 5-fold: unchanged", crossval["unchanged"]),
            ("20 new, 5-fold: fine-tuned", crossval["fine_tuned"])]
    rows += [(f"{name}: {which}", result[f"{which}_{name}"]) for name in ("new_untouched", "holdout")
             for which in ("unchanged", "finetuned")]
    for label, r in rows:
        print(f"{label:28} {r['sensitivity']:6.3f} {r['fp_per_scan']:8.2f} {r['f1']:6.3f} {r.get('cases', 20):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
