"""Issue 31's whole procedure as one resumable command: train from scratch, judge, calibrate, ablate.

    python -m valdocmb.bench.full_run --work ~/.cache/valdocmb [--schedule full] [--jobs 1] [--dry-run]
    python -m valdocmb.bench.full_run --work /tmp/full-run-smoke --schedule smoke --ablation-schedule smoke \
        --cases 1 1 6     # every step on 8 scans: a check of the chain, its figures meaningless (its weights
                          # confirm up to 2,000 candidates a scan, so scoring takes minutes per scan)

In order, each step writing under WORK (one log per step in WORK/logs/, appended):
1. `valdocmb-train` on streamed simulation (`--schedule`) into WORK/weights-stream, state in WORK/train-stream;
2. its learning curves (WORK/learning-curves.png);
3. `bench.weights_eval` into WORK/weights-eval: new, shipped and randomised weights on the in-distribution and
   out-of-distribution hold-outs and the tuning set, with the decision rule fixed before scoring. Shipped and
   randomised are a copy made once (WORK/weights-before), so that shipping the new weights into weights/ while
   the chain goes on does not turn the later evaluations' `shipped` into the new weights;
4. the new weights' int8 calibration (6 tuning scans) and batch-norm reference (4 standard and 4 randomised
   scans of `--seed 41`, never reported);
5. the evaluation again with an int8 arm (decided by its own pre-written rule) and a batch-norm arm;
6. the ablation: the `hour` schedule with the final recipe, with the standard profile only, and with random
   negatives instead of hard ones (that arm starts from the first one's screening stage, which it does not
   change), then all three on the hold-outs.
Training and scoring resume from their own state; the other steps leave a marker in WORK/done/ and are skipped
once made. Stop it at any point; the same command continues. `--dry-run` prints the commands.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core.weights import default_weights_dir
from .jobs import append_line, python, run_logged

ABLATION_SCHEDULE = "hour"
CASES = (50, 40, 20)  # the hold-out, OOD hold-out and tuning sets' cases (issue 31: all of them)
ARMS = {  # ablation arm: the `--set` overrides of the `hour` schedule it trains with
    "hour": [],
    "hour-standard-only": ["standard_share=1"],
    "hour-random-negatives": ["hard_negative_sites=0"],
}


def freeze(source: Path, target: Path) -> None:
    """A copy of the three-stage weights in `source` (with randomised/, without nnU-Net), made once, whole or not
    at all."""
    if target.exists():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("nnunet", ".*"))
    partial.rename(target)


@dataclass
class Step:
    name: str
    command: list[str] = field(default_factory=list)
    once: bool = False                                   # made once (a marker), or resumable by itself
    action: Callable[[], None] | None = None             # a step done here rather than by a command


def steps(work: Path, schedule: str, jobs: int, ablation_schedule: str = ABLATION_SCHEDULE,
          cases: tuple[int, int, int] = CASES) -> list[Step]:
    new, evaluation, before = work / "weights-stream", work / "weights-eval", work / "weights-before"
    arms = ["--weights", f"new={new}", "--weights", f"shipped={before}",
            "--weights", f"randomised={before / 'randomised'}", "--candidate", "new"]
    evaluate = [*python("valdocmb.bench.weights_eval"), "--out", str(evaluation), "--jobs", str(jobs),
                "--holdout-cases", str(cases[0]), "--ood-cases", str(cases[1]), "--tuning-cases", str(cases[2])]
    calibration = work / "int8-data"

    def link_calibration_scans() -> None:   # the first 6 tuning scans, as the shipped calibration was made
        scans = sorted((evaluation / "data" / "tuning").glob("sub-*_T2S.nii.gz"))[:6]
        if len(scans) < 6:
            raise SystemExit(f"{evaluation / 'data' / 'tuning'}: fewer than 6 tuning scans to calibrate int8 on")
        calibration.mkdir(parents=True, exist_ok=True)
        for scan in scans:
            target = calibration / scan.name
            if not target.exists():
                target.symlink_to(scan)

    out = [
        Step("train", [*python("valdocmb.train"), "--out", str(new), "--work", str(work / "train-stream"),
                       "--schedule", schedule, "--workers", "1"]),
        Step("curves", [*python("valdocmb.bench.training"), "--curves", str(work / "train-stream"), "--figure",
                        str(work / "learning-curves.png")], once=True),
        Step("weights-before", once=True, action=lambda: freeze(default_weights_dir(), before)),
        Step("evaluate", [*evaluate, *arms]),
        Step("int8-data", once=True, action=link_calibration_scans),
        Step("int8", [*python("valdocmb.bench.int8"), "--weights", str(new), "--data", str(calibration)], once=True),
    ]
    for profile in ("standard", "randomised"):
        out.append(Step(f"reference-{profile}", [*python("valdocmb.synth"), "--out", str(work / "bn-ref" / profile),
                                                 "--cases", "4", "--seed", "41", "--profile", profile], once=True))
    out.append(Step("batch-norm", [*python("valdocmb.bench.batch_norm"), "--weights", str(new),
                                   "--data", str(work / "bn-ref" / "standard"),
                                   "--data", str(work / "bn-ref" / "randomised")], once=True))
    arms += ["--weights", f"new-int8={new}", "--int8", "new-int8", "--weights", f"new-scan={new}",
             "--batch-norm-scan", "new-scan"]
    out.append(Step("evaluate-int8-batch-norm", [*evaluate, *arms, "--score-sets", "ood", "holdout"]))
    for arm, overrides in ARMS.items():
        arm_work = work / f"ablate-{arm}"
        if arm == "hour-random-negatives":   # the screening stage does not depend on the negatives' kind
            first = work / "ablate-hour" / "screening.ckpt"

            def copy_screening(source=first, target=arm_work / "screening.ckpt") -> None:
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    shutil.copy2(source, target)
            out.append(Step(f"{arm}-screening", once=True, action=copy_screening))
        out.append(Step(arm, [*python("valdocmb.train"), "--out", str(work / f"weights-{arm}"), "--work",
                              str(arm_work), "--schedule", ablation_schedule, "--workers", "1",
                              *[item for o in overrides for item in ("--set", o)]]))
        arms += ["--weights", f"{arm}={work / f'weights-{arm}'}"]
    out.append(Step("evaluate-ablation", [*evaluate, *arms, "--score-sets", "ood", "holdout"]))
    return out


def say(log: Path, text: str) -> None:
    line = f"{datetime.datetime.now().strftime('%F %T')} {text}"
    print(line, flush=True)
    append_line(log, line)


def run(work: Path, schedule: str, jobs: int, dry_run: bool = False, ablation_schedule: str = ABLATION_SCHEDULE,
        cases: tuple[int, int, int] = CASES) -> int:
    done, logs = work / "done", work / "logs"
    for folder in (done, logs):
        folder.mkdir(parents=True, exist_ok=True)
    for step in steps(work, schedule, jobs, ablation_schedule, cases):
        if step.once and (done / step.name).exists():
            continue
        if dry_run:
            print(step.name + ": " + (" ".join(step.command) if step.command else "(done here)"))
            continue
        say(logs / "full_run.log", f"{step.name}: start")
        if step.action is not None:
            step.action()
        else:
            code = run_logged(step.command, logs / f"{step.name}.log")
            if code:
                say(logs / "full_run.log", f"{step.name}: failed (exit {code}); see {logs / step.name}.log")
                return code
        if step.once:
            (done / step.name).touch()
        say(logs / "full_run.log", f"{step.name}: done")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valdocmb.bench.full_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="where everything is made and resumed from")
    parser.add_argument("--schedule", default="full", help="the main run's schedule (valdocmb-train --schedule)")
    parser.add_argument("--jobs", type=int, default=1, help="scoring processes at a time")
    parser.add_argument("--ablation-schedule", default=ABLATION_SCHEDULE, help="the ablation arms' schedule")
    parser.add_argument("--cases", type=int, nargs=3, default=CASES, metavar=("HOLDOUT", "OOD", "TUNING"),
                        help="cases per set (the tuning set needs at least 6 for the int8 calibration)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps still to run")
    args = parser.parse_args(argv)
    return run(args.work.expanduser(), args.schedule, args.jobs, args.dry_run, args.ablation_schedule,
               tuple(args.cases))


if __name__ == "__main__":
    sys.exit(main())
