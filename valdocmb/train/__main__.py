"""`valdocmb-train` (`python -m valdocmb.train`): train the three-stage networks and write inference weights plus
their MANIFEST.json entries, or cross-validate them.

From scratch on streamed simulation (the default; `valdocmb.train.streamed`: dense screening, shared
discrimination, bfloat16 where the CPU has it, regions simulated by --workers processes while training runs):

    valdocmb-train --out weights --work ~/.cache/valdocmb/train [--schedule full|hour|smoke] [--set NAME=VALUE]

The same command continues a stopped run from its checkpoints in --work. On a VALDO-layout folder of labelled
scans (sample pools, `valdocmb.train.three_stage`):

    valdocmb-train --data DIR --out weights [--schedule cpu|gpu|paper] [--set NAME=VALUE] [--device auto] [--seed 0]
    valdocmb-train --data DIR --folds 5 ...        # k-fold cross-validation with VALDO scoring

Fine-tuning given weights on your own labelled scans (docs/training.md, "Using your own labelled scans"):

    valdocmb-train --data DIR --init weights --out my-weights [--folds 5] [--freeze-early] [--mix SIM --mix-ratio 0.3]

starts all three networks from --init (schedule `finetune` unless --schedule says otherwise), adds the false
positives the given weights make on the whole training scans to the mined samples, and, with --folds, reports
the unchanged and the fine-tuned weights side by side on the same folds, then chooses the lesion rule on the
out-of-fold results and trains the final weights on every case. --out must be a new folder: the parent weights
stay as they are, and the manifest records their version.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..core import manifest
from ..core.imageio import write_text_atomic
from ..core.lesion_rule import MANIFEST_KEY
from ..core.logs import setup_logging
from ..core.manifest import command_line
from ..core.preprocess import DEFAULT_TARGET_SPACING
from .samples import Crop, find_training_cases
from .schedules import SCHEDULES, STREAM_SCHEDULES, schedule_with, stream_schedule_with
from .stream import GRID_MIX, PROFILE_MIX

# the networks' modules import torch: they are imported where used, so that --help needs none

log = logging.getLogger("valdocmb.train")


def finetune_problem(args) -> str | None:
    """Why the fine-tuning options cannot work together, before anything is computed."""
    if not args.init:
        if args.freeze_early or args.mix:
            return "--freeze-early and --mix apply to fine-tuning: give the weights to start from with --init"
        return None
    if not args.init.is_dir():
        return f"--init {args.init}: not a weights folder"
    if args.out.resolve() == args.init.resolve():
        return f"--out {args.out} is the --init folder: write the fine-tuned weights to a new folder"
    if not 0 < args.mix_ratio < 1:
        return f"--mix-ratio {args.mix_ratio}: a share between 0 and 1"
    if args.mix and not find_training_cases(args.mix):
        return f"--mix {args.mix}: no scan with a label"
    return None


def mixed_in(args, crops: list[Crop], spacing) -> list[Crop]:
    """Crops of the --mix cases, as many as make --mix-ratio of the training crops (drawn at random, all kinds in
    their own proportions); their cases are named mix:<subject>, so that no fold ever tests on them."""
    from .three_stage import build_pools, pool_cache
    mix_crops = build_pools(find_training_cases(args.mix), args.seed, args.workers,
                            pool_cache(args.work / "mix", args.seed, spacing), spacing)
    wanted = min(len(mix_crops), round(len(crops) * args.mix_ratio / (1 - args.mix_ratio)))
    chosen = np.random.default_rng(args.seed).choice(len(mix_crops), size=wanted, replace=False)
    log.info("mixing in %d of %d crops from %s (%.0f %% of the training crops)", wanted, len(mix_crops), args.mix,
             100 * wanted / max(1, wanted + len(crops)))
    return [replace(mix_crops[i], case=f"mix:{mix_crops[i].case}") for i in sorted(chosen)]


def complete_from_parent(parent: Path, out: Path, lesion_rule: dict | None) -> None:
    """Make `out` a complete weights folder: the parent's other files (nnU-Net) with their manifest entries, and the
    lesion rule chosen on the new data (the parent's was chosen for the parent's networks, so it is not carried)."""
    from ..core.three_stage import WEIGHT_FILES, weights_version
    parent_files = manifest.read(parent)["files"]
    copied = {}
    for relative, entry in parent_files.items():
        if relative in WEIGHT_FILES.values() or (out / relative).exists():
            continue
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(parent / relative, out / relative)
        copied[relative] = entry

    def change(content: dict) -> None:
        content["files"].update(copied)
        if lesion_rule:
            content[MANIFEST_KEY] = {**lesion_rule, "weights": weights_version(out)}

    manifest.update(out, change)
    if copied:
        log.info("copied %s from %s", ", ".join(sorted(copied)), parent)
    if not lesion_rule:
        log.warning("%s has no lesion rule (every component of the map is kept): fine-tune with --folds K to choose "
                    "one on your cases, cross-fitted", out)


def train_from_stream(args, argv, device) -> int:
    """From-scratch (or --init) training on streamed simulated regions: weights and manifest in --out."""
    import torch

    from ..core.three_stage import ThreeStagePipeline
    from .streamed import train_streamed
    from .three_stage import networks, write_weights
    unusable = [flag for flag, used in (("--folds", args.folds), ("--mix", args.mix), ("--pool-only", args.pool_only),
                                        ("--max-cases", args.max_cases), ("--freeze-early", args.freeze_early)) if used]
    if unusable:
        log.error("%s need labelled scans: give them with --data", ", ".join(unusable))
        return 2
    name = args.schedule or "full"
    if name not in STREAM_SCHEDULES:
        log.error("--schedule %s applies to --data; streamed schedules: %s", name, ", ".join(STREAM_SCHEDULES))
        return 2
    schedule = stream_schedule_with(STREAM_SCHEDULES[name], args.set)
    parent = ThreeStagePipeline.from_weights(args.init, "cpu") if args.init else None
    if parent and not any(item.startswith("learning_rate_scale=") for item in args.set):
        schedule = replace(schedule, learning_rate_scale=0.1)  # from given weights: a tenth, as `finetune` does
    if parent and args.out.resolve() == args.init.resolve():
        log.error("--out %s is the --init folder: write the new weights to a new folder", args.out)
        return 2
    spacing = tuple(float(v) for v in (args.spacing or (parent.config.target_spacing if parent
                                                        else DEFAULT_TARGET_SPACING)))
    workers = 1 if args.workers is None else args.workers
    started = time.perf_counter()
    nets, record = train_streamed(schedule, device, args.work, args.seed, workers, spacing, args.precision,
                                  init=networks(parent) if parent else None)
    meta = {
        "data": "streamed simulated regions (valdocmb.synth.region): profiles "
                + ", ".join(f"{k} {v:.0%}" for k, v in PROFILE_MIX.items()) + "; grids "
                + ", ".join(f"{k} {v:.0%}" for k, v in GRID_MIX.items()),
        "regions": record["stream"], "schedule": name + "".join(f" --set {item}" for item in args.set),
        "schedule_detail": asdict(schedule), "seed": args.seed, "precision": record["precision"],
        "command": command_line("valdocmb-train", argv), "device": str(device), "hardware": _hardware(device),
        "last_process_wall_time_s": round(time.perf_counter() - started),   # a resumed run's last leg
        "training_s": {k: v["seconds"] for k, v in record["curves"].items()},
        "package_version": __version__, "torch": torch.__version__, "target_spacing": list(spacing),
    }
    if parent:
        meta["parent"] = parent.weights_info
    write_weights(nets, args.out, record, meta)
    write_text_atomic(json.dumps(record, indent=1), args.work / "history.json")
    log.info("weights written to %s (%.0f s in this process)", args.out, time.perf_counter() - started)
    return 0


def _hardware(device) -> str:
    import torch
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
            + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="VALDO-layout folder with *_CMB.nii.gz labels (default: train on streamed simulation)")
    parser.add_argument("--out", type=Path, default=Path("weights"), help="weights folder to write")
    parser.add_argument("--work", type=Path, default=Path("runs/train"), help="checkpoints, pool cache, logs")
    parser.add_argument("--schedule", choices=tuple(dict.fromkeys([*STREAM_SCHEDULES, *SCHEDULES])), default=None,
                        help="streamed: full (default), hour or smoke; with --data: cpu (default), gpu, paper, or "
                        "finetune (the default with --init)")
    parser.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="streamed training's arithmetic (auto: bfloat16 on CUDA and on CPUs that have it)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one number of the schedule, e.g. --set discrimination_iterations=30 (repeatable)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="processing grid in mm that the crops are made at and inference resamples to "
                        f"(default {DEFAULT_TARGET_SPACING}, the median VALDO spacing; with --init, the given "
                        "weights')")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes building the sample pool (default 2), or simulating regions while a "
                        "streamed run trains (default 1; 0: in the training process)")
    parser.add_argument("--max-cases", type=int, default=None, help="use only the first N cases")
    parser.add_argument("--folds", type=int, default=0,
                        help="k-fold cross-validation instead of final training (with --init: before it, and the "
                        "lesion rule is chosen on its out-of-fold results)")
    parser.add_argument("--pool-only", action="store_true", help="build (and cache) the sample pool, then stop")
    parser.add_argument("--init", type=Path, default=None,
                        help="fine-tune: start every network from this weights folder (e.g. weights/)")
    parser.add_argument("--freeze-early", action="store_true",
                        help="with --init: keep the first two convolution blocks of each network as given")
    parser.add_argument("--mix", type=Path, default=None,
                        help="with --init: a second labelled folder (e.g. simulated cases) mixed into training so "
                        "that the model keeps what it knew")
    parser.add_argument("--mix-ratio", type=float, default=0.3,
                        help="share of the training crops that come from --mix (default %(default)s)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="with --init --folds: train and score the folds and the final weights this many at a "
                        "time in separate processes (a GPU with memory and CPU cores to spare); default one after "
                        "the other")
    parser.add_argument("--min-sensitivity", type=float, default=0.9,
                        help="with --init --folds: the lesion rule's sensitivity floor (as valdocmb-tune)")
    args = parser.parse_args(argv)
    setup_logging()
    import torch

    from ..core.device import resolve_device
    from ..core.three_stage import ThreeStagePipeline
    from .crossval import cross_validate, cross_validate_finetuning
    from .three_stage import build_pools, carried_thresholds, networks, pool_cache, train_all, write_weights

    device = resolve_device(args.device)
    if args.data is None:
        return train_from_stream(args, argv, device)
    args.workers = 2 if args.workers is None else args.workers
    if args.schedule is not None and args.schedule not in SCHEDULES:
        log.error("--schedule %s is a streamed schedule; with --data: %s", args.schedule, ", ".join(SCHEDULES))
        return 2
    cases = find_training_cases(args.data)[: args.max_cases]
    if not cases:
        log.error("%s: no scan with a label (sub-*_space-T2S_desc-masked_T2S.nii.gz + _CMB.nii.gz)", args.data)
        return 2
    problem = finetune_problem(args)
    if problem:
        log.error("%s", problem)
        return 2
    # the given weights with their lesion rule, scored as the container runs them (precision auto: bfloat16 on a
    # CPU that has it) when --folds compares them with the fine-tuned ones
    parent = ThreeStagePipeline.from_weights(args.init, str(device), precision="auto") if args.init else None
    args.schedule = args.schedule or ("finetune" if args.init else "cpu")
    schedule = schedule_with(SCHEDULES[args.schedule], args.set)
    spacing = tuple(float(v) for v in (args.spacing or (parent.config.target_spacing if parent
                                                        else DEFAULT_TARGET_SPACING)))
    if parent and tuple(parent.config.target_spacing) != spacing:
        log.error("--spacing %s: the weights in %s were trained on a %s mm grid; fine-tuning keeps it", spacing,
                  args.init, parent.config.target_spacing)
        return 2
    log.info("training on %d cases from %s, schedule %s %s, processing grid %s mm, device %s%s", len(cases),
             args.data, args.schedule, asdict(schedule), spacing, device,
             f", starting from {args.init} ({parent.weights_info['version']})" if parent else "")
    started = time.perf_counter()
    version = parent.weights_info["version"] if parent else None
    crops = build_pools(cases, args.seed, args.workers, pool_cache(args.work, args.seed, spacing, version), spacing,
                        init_dir=args.init, device=device)
    if args.mix:
        crops += mixed_in(args, crops, spacing)

    if args.pool_only:
        return 0
    lesion_rule = None
    final_work = args.work / "final"  # the final fine-tuned weights' checkpoints (with --folds, trained alongside)
    if args.folds and parent:
        result = cross_validate_finetuning(cases, crops, args.folds, schedule, device, args.work, args.seed, spacing,
                                           parent, args.freeze_early, args.min_sensitivity, args.parallel,
                                           final_work=final_work)
        lesion_rule = {**result["rule"], "chosen_on": f"{args.data}: out-of-fold results of {args.folds}-fold "
                       "fine-tuning", "weights": "these (fine-tuned on all cases)", "objective":
                       f"highest pooled F1 with pooled sensitivity >= {args.min_sensitivity}",
                       "cross_fitted": result["fine_tuned"], "unchanged_weights": result["unchanged"],
                       "folds": result["rule_folds"], "command": command_line("valdocmb-train", argv)}
    elif args.folds:
        return cross_validate(cases, crops, args.folds, schedule, device, args.work, args.seed, spacing)

    nets, record = train_all(crops, schedule, device, final_work if lesion_rule else args.work, args.seed,
                             init=networks(parent) if parent else None, freeze_early=args.freeze_early)
    if parent:   # stored with the weights as streamed training stores the thresholds it chose
        record.update({name: {"threshold": value, "chosen_on": f"carried from {args.init}"}
                       for name, value in carried_thresholds(parent).items()})
    stage_seconds = sum(e["seconds"] for v in record.values() if isinstance(v, list) for e in v)
    meta = {
        "data": str(args.data), "cases": len(cases), "subjects": [c[0] for c in cases],
        "schedule": args.schedule + "".join(f" --set {item}" for item in args.set),
        "schedule_detail": asdict(schedule), "seed": args.seed,
        "command": command_line("valdocmb-train", argv),
        "device": str(device), "hardware": _hardware(device),
        "wall_time_s": round(time.perf_counter() - started), "training_iterations_s": round(stage_seconds),
        "package_version": __version__,
        "torch": torch.__version__, "target_spacing": list(spacing),
    }
    if parent:
        meta["parent"] = {**parent.weights_info, "freeze_early": args.freeze_early}
        if args.mix:
            meta["mix"] = {"data": str(args.mix), "ratio": args.mix_ratio}
    write_weights(nets, args.out, record, meta)
    if parent:
        complete_from_parent(args.init, args.out, lesion_rule)
    write_text_atomic(json.dumps(record, indent=1), args.work / "history.json")
    log.info("weights written to %s (%.0f s)", args.out, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
