"""Generate simulated T2* cases in the VALDO layout.

    valdocmb-synth --out DIR --cases N --seed S [--grid mix|rss|sabre|alfa3|alfa4|random] [--workers K]
                   [--profile standard|randomised|ood] [--set NAME=VALUE ...]

--profile picks a named set of parameters (`valdocmb.synth.simulate.PROFILES`): "standard" (the default, the
simulator as it first was), "randomised" (domain randomisation: two anatomy sources, atrophy, white-matter patches,
wide tissue contrast, iron, bias order, Gibbs ringing, motion ghosts, slice profiles, skull-stripping edges,
tortuous and branching veins, flow voids, calcifications anywhere) or "ood" (the out-of-distribution hold-out:
"randomised" with an anatomy source, a vein model, a deep-grey iron range and a bias range that "randomised" never
uses). --set changes single parameters on top of the profile.

--set changes one of the simulator's parameters (`valdocmb.synth.simulate.DEFAULTS`; VALUE in JSON, ranges as
[low, high]), e.g. `--set snr=[6,10] --set veins=[40,70]` for scans unlike the training set; the changes are
recorded in every case's sim.json under "overrides".

Per case: sub-XXX_space-T2S_desc-masked_T2S.nii.gz (scan), sub-XXX_space-T2S_CMB.nii.gz (visible-microbleed label)
and sub-XXX_space-T2S_sim.json (every inserted object and all acquisition parameters). Case i's random stream is
derived from (seed, i), so any case can be regenerated alone and adding cases never changes earlier ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from ..core.logs import peak_memory_mb, setup_logging

log = logging.getLogger("valdocmb.synth")

# Mixture of grids for --grid mix: the three VALDO cohorts and random in-between protocols.
GRID_MIX = {"rss": 0.3, "sabre": 0.2, "alfa3": 0.15, "alfa4": 0.1, "random": 0.25}


def case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def choose_grid(grid: str, seed: int) -> str:
    if grid != "mix":
        return grid
    rng = np.random.default_rng(seed)
    names = list(GRID_MIX)
    return names[rng.choice(len(names), p=np.array(list(GRID_MIX.values())))]


def parse_overrides(items: list[str]) -> dict:
    """NAME=VALUE pairs as simulator parameters, each held to the type and shape of its default (SystemExit)."""
    from .simulate import DEFAULTS, check_choices

    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in DEFAULTS:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(DEFAULTS))}")
        default = DEFAULTS[name]
        try:
            value = json.loads(text)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {text!r} is not a JSON value") from None
        if isinstance(default, tuple):
            if not (isinstance(value, list) and len(value) == len(default)
                    and all(isinstance(v, (int, float)) for v in value)):
                raise SystemExit(f"--set {item!r}: expected {len(default)} numbers like {list(default)}")
            value = tuple(value)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)):
                raise SystemExit(f"--set {item!r}: expected a number like {default}")
        elif type(value) is not type(default):
            raise SystemExit(f"--set {item!r}: expected a value like {json.dumps(default)}")
        overrides[name] = value
    try:
        check_choices({**DEFAULTS, **overrides})
    except ValueError as exc:
        raise SystemExit(f"--set: {exc}") from None
    return overrides


def generate_one(out_dir: str, subject: str, seed: int, grid: str, threads: int = 1, phase: bool = False,
                 overrides: dict | None = None, profile: str = "standard") -> dict:
    import SimpleITK as sitk

    from ..core.imageio import write_image_atomic, write_text_atomic
    from .simulate import simulate_case

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    out = Path(out_dir)
    case = simulate_case(seed, choose_grid(grid, seed), with_phase=phase, **(overrides or {}))
    write_image_atomic(case.image, out / f"{subject}_space-T2S_desc-masked_T2S.nii.gz")
    write_image_atomic(case.label, out / f"{subject}_space-T2S_CMB.nii.gz")
    if case.phase is not None:
        write_image_atomic(case.phase, out / f"{subject}_space-T2S_phase.nii.gz")
    case.meta["subject"] = subject
    case.meta["profile"] = profile
    case.meta["overrides"] = json.loads(json.dumps(overrides or {}))  # every parameter not at its default
    case.meta["peak_rss_mb"] = peak_memory_mb()
    write_text_atomic(json.dumps(case.meta, indent=1), out / f"{subject}_space-T2S_sim.json")
    return case.meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default="mix", choices=("mix", "rss", "sabre", "alfa3", "alfa4", "random"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--start", type=int, default=1, help="number of the first subject (sub-XXX)")
    parser.add_argument("--phase", action="store_true", help="also write the phase image")
    parser.add_argument("--profile", default="standard", choices=("standard", "randomised", "ood"),
                        help="a named set of simulator parameters (see above)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a simulator parameter (JSON value), e.g. snr=[6,10] (repeatable)")
    args = parser.parse_args(argv)
    from .simulate import PROFILES

    overrides = {**PROFILES[args.profile], **parse_overrides(args.set)}
    setup_logging()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    jobs = []
    for i in range(args.start, args.start + args.cases):
        subject = f"sub-{i:03d}"
        jobs.append((str(args.out), subject, case_seed(args.seed, i), args.grid, 1, args.phase, overrides,
                     args.profile))
    log.info("simulating %d case(s) into %s with %d worker(s), seed %d, grid %s, profile %s%s", args.cases,
             args.out, args.workers, args.seed, args.grid, args.profile,
             f", parameters changed: {overrides}" if overrides else "")
    start, done, failed = time.perf_counter(), 0, 0
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(generate_one, *job): job[1] for job in jobs}
        for future in as_completed(futures):
            done += 1
            subject = futures[future]
            try:
                meta = future.result()
            except Exception as exc:  # report and carry on with the other cases
                failed += 1
                log.error("[%d/%d] %s failed: %s", done, args.cases, subject, exc)
                continue
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (args.cases - done)
            log.info("[%d/%d] %s %-6s %s CMB (%d visible), %d veins, %d calc.  %.1f s, %d MB  | eta %.0f s",
                     done, args.cases, subject, meta["acquisition"]["grid"], meta["counts"]["cmb"],
                     meta["counts"]["cmb_visible"], meta["counts"]["vein"], meta["counts"]["calcification"],
                     meta["seconds"], meta["peak_rss_mb"], eta)
    log.info("done: %d case(s) in %.0f s, %d failed", args.cases - failed, time.perf_counter() - start, failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
