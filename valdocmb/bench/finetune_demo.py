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
import logging
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..core.lesion_rule import rule_from_manifest
from ..core.logs import setup_logging
from ..core.weights import default_weights_dir
from ..evaluate.scoring import pooled
from ..train.samples import find_training_cases
from ..train.stagewise import stage_scores

log = logging.getLogger("valdocmb.finetune_demo")

# simulator settings outside the training ranges (snr 12-40, veins 8-30, calcifications 0-3, bias 0.05-0.25)
STAND_IN = ["--grid", "alfa3", "--seed", "7", "--set", "snr=[7,11]", "--set", "veins=[35,60]",
            "--set", "calcifications=[2,5]", "--set", "bias_amplitude=[0.3,0.45]"]
SETS = {  # folder: valdocmb-synth arguments
    "new_finetune": ["--cases", "20", "--start", "1", *STAND_IN],
    "new_untouched": ["--cases", "30", "--start", "21", *STAND_IN],
    "mix": ["--cases", "12", "--seed", "11"],
}


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def run_all(commands: dict[str, list[str]], logs: Path, at_once: int) -> None:
    """Run the named commands, `at_once` at a time, each logging to logs/<name>.log; stop on the first failure."""
    waiting, running = list(commands.items()), {}
    while waiting or running:
        while waiting and len(running) < at_once:
            name, command = waiting.pop(0)
            log.info("start %s: %s", name, " ".join(command))
            with open(logs / f"{name}.log", "w") as output:  # the child keeps its own copy of the file
                running[name] = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        time.sleep(1)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode:
                    for other in running.values():
                        other.kill()
                    raise SystemExit(f"{name} failed (exit {process.returncode}): see {logs / name}.log")
                log.info("done %s", name)


def scoring(weights: Path, data: Path, cache: Path, device: str, processes: int, tag: str) -> dict[str, list[str]]:
    """`valdocmb-stagewise` commands that share the scans of `data` between `processes` processes."""
    subjects = [subject for subject, _, _ in find_training_cases(data)]
    shares = [subjects[i::processes] for i in range(processes) if subjects[i::processes]]
    return {f"{tag}-{i}": python("valdocmb.train.stagewise", "--data", str(data), "--weights", str(weights),
                                 "--device", device, "--cache", str(cache), "--subjects", *share)
            for i, share in enumerate(shares)}


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
    total = sum(int(a[a.index("--cases") + 1]) for a in sets.values())
    run_all({f"synth-{name}": python("valdocmb.synth", "--out", str(data / name), "--workers",
                                     str(max(1, round(args.jobs * int(a[a.index("--cases") + 1]) / total))), *a)
             for name, a in sets.items() if not any((data / name).glob("sub-*_CMB.nii.gz"))}, logs, len(sets))
    seconds["synth"] = time.perf_counter() - started

    # fine-tuning (cross-validation, then the final weights) while the unchanged weights score the other sets
    started = time.perf_counter()
    unchanged_scoring = {}
    for name in ("new_untouched", "holdout"):
        unchanged_scoring.update(scoring(weights, data / name, args.out / "scores" / f"unchanged-{name}",
                                         args.device, max(1, args.jobs // 8), f"unchanged-{name}"))
    training = {} if (tuned / "MANIFEST.json").is_file() else {"train": python(
        "valdocmb.train", "--data", str(data / "new_finetune"), "--init", str(weights), "--out", str(tuned),
        "--work", str(work), "--folds", "5", "--mix", str(data / "mix"), "--mix-ratio", "0.3", "--device", args.device,
        "--workers", str(max(1, args.jobs // 2)), "--parallel", str(args.parallel_folds))}
    with ThreadPoolExecutor(2) as both:
        side = both.submit(run_all, unchanged_scoring, logs, len(unchanged_scoring))
        run_all(training, logs, 1)
        seconds["finetune_crossval_and_final"] = time.perf_counter() - started
        side.result()
    seconds["unchanged_scoring_and_finetuning"] = time.perf_counter() - started

    started = time.perf_counter()
    tuned_scoring = {}
    for name in ("new_untouched", "holdout"):
        tuned_scoring.update(scoring(tuned, data / name, args.out / "scores" / f"finetuned-{name}", args.device,
                                     max(1, args.jobs // 4), f"finetuned-{name}"))
    run_all(tuned_scoring, logs, args.jobs)
    seconds["finetuned_scoring"] = time.perf_counter() - started

    crossval = json.loads((work / "finetune_crossval.json").read_text())
    result = {
        "stand_in": " ".join(STAND_IN), "sets": {k: " ".join(v) for k, v in sets.items()},
        "crossval_20": {"unchanged": crossval["unchanged"], "fine_tuned": crossval["fine_tuned"],
                        "folds": crossval["table"]},
        **{f"{which}_{name}": figures(w, args.out / "scores" / f"{which}-{name}")
           for which, w in (("unchanged", weights), ("finetuned", tuned)) for name in ("new_untouched", "holdout")},
        "seconds": {k: round(v) for k, v in seconds.items()},
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs" + _gpu(),
    }
    summary_path.write_text(json.dumps(result, indent=1, default=float).replace("NaN", "null"))
    print(f"{'':28} {'sens':>6} {'FP/scan':>8} {'F1':>6} {'cases':>6}")
    rows = [("20 new, 5-fold: unchanged", crossval["unchanged"]), ("20 new, 5-fold: fine-tuned", crossval["fine_tuned"])]
    rows += [(f"{name}: {which}", result[f"{which}_{name}"]) for name in ("new_untouched", "holdout")
             for which in ("unchanged", "finetuned")]
    for label, r in rows:
        print(f"{label:28} {r['sensitivity']:6.3f} {r['fp_per_scan']:8.2f} {r['f1']:6.3f} {r.get('cases', 20):>6}")
    return 0


def _gpu() -> str:
    import torch

    return f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""


if __name__ == "__main__":
    sys.exit(main())
