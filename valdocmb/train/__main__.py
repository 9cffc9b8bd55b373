"""`valdocmb-train` (`python -m valdocmb.train`): train the three-stage networks on a VALDO-layout folder and write
inference weights plus their MANIFEST.json entries, or cross-validate them.

    valdocmb-train --data DIR --out weights [--schedule cpu|gpu|paper] [--set NAME=VALUE] [--device auto] [--seed 0]
    valdocmb-train --data DIR --folds 5 ...        # k-fold cross-validation with VALDO scoring
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..core.device import resolve_device
from ..core.logs import setup_logging
from ..core.manifest import command_line
from ..core.preprocess import DEFAULT_TARGET_SPACING
from .crossval import cross_validate
from .samples import find_training_cases
from .three_stage import SCHEDULES, build_pools, pool_cache, schedule_with, train_all, write_weights

log = logging.getLogger("valdocmb.train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="VALDO-layout folder with *_CMB.nii.gz labels")
    parser.add_argument("--out", type=Path, default=Path("weights"), help="weights folder to write")
    parser.add_argument("--work", type=Path, default=Path("runs/train"), help="checkpoints, pool cache, logs")
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one number of the schedule, e.g. --set discrimination_iterations=30 (repeatable)")
    parser.add_argument("--spacing", type=float, nargs=3, default=DEFAULT_TARGET_SPACING, metavar=("X", "Y", "Z"),
                        help="processing grid in mm that the crops are made at and inference resamples to "
                        "(default %(default)s, the median VALDO spacing)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes building the sample pool")
    parser.add_argument("--max-cases", type=int, default=None, help="use only the first N cases")
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation instead of final training")
    parser.add_argument("--pool-only", action="store_true", help="build (and cache) the sample pool, then stop")
    args = parser.parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    cases = find_training_cases(args.data)[: args.max_cases]
    if not cases:
        log.error("%s: no scan with a label (sub-*_space-T2S_desc-masked_T2S.nii.gz + _CMB.nii.gz)", args.data)
        return 2
    schedule = schedule_with(SCHEDULES[args.schedule], args.set)
    spacing = tuple(float(v) for v in args.spacing)
    log.info("training on %d cases from %s, schedule %s %s, processing grid %s mm, device %s", len(cases), args.data,
             args.schedule, asdict(schedule), spacing, device)
    started = time.perf_counter()
    crops = build_pools(cases, args.seed, args.workers, pool_cache(args.work, args.seed, spacing), spacing)

    if args.pool_only:
        return 0
    if args.folds:
        return cross_validate(cases, crops, args.folds, schedule, device, args.work, args.seed, spacing)

    nets, record = train_all(crops, schedule, device, args.work, args.seed)
    stage_seconds = sum(e["seconds"] for v in record.values() if isinstance(v, list) for e in v)
    meta = {
        "data": str(args.data), "cases": len(cases), "subjects": [c[0] for c in cases],
        "schedule": args.schedule + "".join(f" --set {item}" for item in args.set),
        "schedule_detail": asdict(schedule), "seed": args.seed,
        "command": command_line("valdocmb-train", argv),
        "device": str(device), "hardware": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "wall_time_s": round(time.perf_counter() - started), "training_iterations_s": round(stage_seconds),
        "package_version": __version__,
        "torch": torch.__version__, "target_spacing": list(spacing),
    }
    write_weights(nets, args.out, record, meta)
    (args.work / "history.json").write_text(json.dumps(record, indent=1))
    log.info("weights written to %s (%.0f s)", args.out, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
