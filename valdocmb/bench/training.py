"""Training throughput, the pool path (per-patch, float32, whole simulated scans) against the streamed path (dense
screening, shared discrimination, bfloat16, simulated regions), measured in one run on this machine.

    python -m valdocmb.bench.training [--device cpu|cuda] [--regions 24] [--scans 3] [--out report.json]
    python -m valdocmb.bench.training --losses 300     # dense screening: class-balanced vs hardest negatives
    python -m valdocmb.bench.training --precisions 60  # dense screening: float32 vs bfloat16 loss curves
    python -m valdocmb.bench.training --score weights  # given weights on the streamed run's validation regions
    python -m valdocmb.bench.training --curves WORK --figure curves.png   # a streamed run's learning curves
    python -m valdocmb.bench.training --candidates WORK SCAN ...   # candidates per scan: shipped vs WORK's screening

Per stage: labelled positions (screening) or samples per second, and seconds per step, each path timed on the
same regions with the same networks. Simulation: training crops per CPU-second, where a whole scan yields the
crops of the pool path (`case_pool`: one per microbleed, 24 random, the recorded mimics and vessel points) and a
region the sites the streamed path uses (microbleeds, mimics, 4 random) plus its screening crop.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.models.segmentation import SegmentationUNet

from ..core.device import resolve_device
from ..core.imageio import write_image_atomic, write_text_atomic
from ..core.logs import setup_logging
from ..core.patches import extract_patches
from ..train import dense, streamed
from ..train.samples import CROP, Crop, case_pool, draw_batch
from ..train.schedules import STREAM_SCHEDULES
from ..train.stream import REGIONS_PER_CASE, make_case
from ..train.three_stage import CLASS_WEIGHTS, soft_dice_loss
from .jobs import hardware

log = logging.getLogger("valdocmb.bench")


def pools_from(regions) -> dict[str, list[Crop]]:
    """The pool path's crops (36x48x48) cut from the regions: positives, random negatives, mimics."""
    pools: dict[str, list[Crop]] = {"positive": [], "negative": [], "mined": []}
    for region in regions:
        sites = streamed.region_sites(region, streamed.region_rng(region))
        for kind, pool in (("positive", "positive"), ("random", "negative"), ("mimic", "mined")):
            for centre in sites[kind]:
                pools[pool].append(Crop(extract_patches(region.volume, [centre], CROP)[0].astype(np.float16),
                                        extract_patches(region.label, [centre], CROP)[0].astype(np.uint8), pool, "x"))
    return pools


def time_steps(step, count: int) -> tuple[float, int]:
    """Seconds per step and items per step over `count` steps after one warm-up step."""
    step()
    started, items = time.perf_counter(), 0
    for _ in range(count):
        items += step()
    return (time.perf_counter() - started) / count, items // count


def pool_step(net, pools, proportions, patch, samples, batch, device, segmentation=False):
    """One iteration of the pool path (`three_stage.run_stage`): draw and augment, then batches in float32."""
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    weights = torch.tensor(CLASS_WEIGHTS, device=device)
    rng = np.random.default_rng(0)

    def step():
        volumes, classes, labels = draw_batch(pools, proportions, samples, patch, rng)
        net.train()
        for b in range(0, samples, batch):
            x = torch.from_numpy(volumes[b:b + batch]).to(device)
            logits = net(x)
            if segmentation:
                loss = soft_dice_loss(logits, torch.from_numpy(labels[b:b + batch]).to(device))
            else:
                loss = torch.nn.functional.cross_entropy(logits.reshape(len(x), 2),
                                                         torch.from_numpy(classes[b:b + batch]).to(device),
                                                         weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return samples
    return step


def stream_step(stage, buffer, cast):
    optimizer = stage.optimizer(0.1)
    rng = np.random.default_rng(0)

    def step():
        stage.net.train()
        with cast():
            loss, items = stage.step(buffer, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return items
    return step


def throughput(regions, device, steps: int) -> list[dict]:
    torch.manual_seed(0)
    cast, precision = dense.autocast(device, "auto")
    pools = pools_from(regions)
    schedule = STREAM_SCHEDULES["full"]
    screening = ScreeningFCN().to(device)
    rows = []

    def row(stage, unit, old, new):
        (old_s, old_n), (new_s, new_n) = old, new
        rows.append({"stage": stage, "unit": unit, "pool_per_s": round(old_n / old_s, 1),
                     "pool_s_per_step": round(old_s, 3), "streamed_per_s": round(new_n / new_s, 1),
                     "streamed_s_per_step": round(new_s, 3), "ratio": round((new_n / new_s) / (old_n / old_s), 1),
                     "streamed_precision": precision})
        log.info("%s: pool path %.1f %s/s, streamed %.1f %s/s (%.1fx)", stage, old_n / old_s, unit, new_n / new_s,
                 unit, rows[-1]["ratio"])

    row("screening", "labelled positions",
        time_steps(pool_step(screening, pools, {"positive": 1, "negative": 2, "mined": 1}, ScreeningFCN.patch_size,
                             256, 64, device), steps),
        time_steps(stream_step(streamed.ScreeningStage(ScreeningFCN().to(device), schedule, device, cast),
                               regions, cast), steps))
    mining = functools.partial(streamed.screening_probabilities, screening, device=device, cast=cast)
    sited = [(r, streamed.region_sites(r, streamed.region_rng(r), mining)) for r in regions]
    row("discrimination", "samples",
        time_steps(pool_step(DiscriminationCNN().to(device), pools, {"positive": 1, "mined": 1},
                             DiscriminationCNN.patch_size, 256, 64, device), steps),
        time_steps(stream_step(streamed.DiscriminationStage(DiscriminationCNN().to(device), mining, schedule,
                                                            device, cast), sited, cast), steps))
    row("segmentation", "samples",
        time_steps(pool_step(SegmentationUNet().to(device), pools, {"positive": 3, "mined": 1},
                             SegmentationUNet.patch_size, 64, 16, device, segmentation=True), steps),
        time_steps(stream_step(streamed.SegmentationStage(SegmentationUNet().to(device), mining, schedule,
                                                          device, cast), sited, cast), steps))
    return rows


def simulation(scans: int, regions: int) -> dict:
    """Training crops per CPU-second: whole scans through the pool path's case_pool, against regions."""
    from ..synth.simulate import PROFILES, simulate_case

    make_case(0, 0)  # loads the anatomy templates once, for both paths
    grids = ["alfa3", "sabre", "rss", "alfa4", "random"]
    crops = cpu = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(scans):
            started = time.process_time()
            case = simulate_case(1000 + i, grids[i % len(grids)], **PROFILES["randomised"])  # type: ignore[arg-type]
            scan, label = Path(scratch) / f"s{i}_T2S.nii.gz", Path(scratch) / f"s{i}_CMB.nii.gz"
            write_image_atomic(case.image, scan)
            write_image_atomic(case.label, label)
            write_text_atomic(json.dumps(case.meta), Path(scratch) / f"s{i}_space-T2S_sim.json")
            crops += len(case_pool(f"s{i}", scan, label, np.random.default_rng(i)))
            cpu += time.process_time() - started
    whole = {"scans": scans, "crops": int(crops), "cpu_s": round(cpu, 1), "crops_per_cpu_s": round(crops / cpu, 2)}
    crops = cpu = 0.0
    for number in range(-(-regions // REGIONS_PER_CASE)):
        started = time.process_time()
        for region in make_case(7, number):
            sites = streamed.region_sites(region, streamed.region_rng(region))
            crops += 1 + sum(len(sites[k]) for k in ("positive", "mimic", "random"))
        cpu += time.process_time() - started
    parts = {"regions": -(-regions // REGIONS_PER_CASE) * REGIONS_PER_CASE, "crops": int(crops), "cpu_s": round(cpu, 1),
             "crops_per_cpu_s": round(crops / cpu, 2)}
    log.info("simulation: whole scans %.2f crops/CPU-s, regions %.2f crops/CPU-s (%.1fx)",
             whole["crops_per_cpu_s"], parts["crops_per_cpu_s"], parts["crops_per_cpu_s"] / whole["crops_per_cpu_s"])
    return {"whole_scans": whole, "regions": parts,
            "ratio": round(parts["crops_per_cpu_s"] / whole["crops_per_cpu_s"], 1)}


def compare_precisions(steps: int, device, work: Path, seed: int) -> list[dict]:
    """Dense screening for `steps` steps on the same stream from the same start in float32 and in bfloat16: the
    training loss in blocks of 10 steps, seconds per step, and the validation figures at the end."""
    results = []
    for precision in ("float32", "bfloat16"):
        schedule = replace(STREAM_SCHEDULES["full"], validate_every=steps)
        cast, _ = dense.autocast(device, precision)
        validation = streamed.validation_regions(work, seed, schedule.validation_regions, 1, (0.49, 0.49, 0.8))
        torch.manual_seed(seed)
        stage = streamed.ScreeningStage(ScreeningFCN(), schedule, device, cast)
        folder = work / f"precision_{precision}_{steps}"
        history = streamed.run_stage(stage, steps, schedule, seed, folder, device, 1, (0.49, 0.49, 0.8), validation,
                                     cast)
        train = [e for e in history if "validation" not in e]
        results.append({"precision": precision, "steps": steps,
                        "loss_per_10_steps": [round(float(np.mean([e["loss"] for e in train[i:i + 10]])), 4)
                                              for i in range(0, len(train), 10)],
                        "seconds_per_step": round(float(np.mean([e["seconds"] for e in train[1:]])), 2),
                        **[e for e in history if "validation" in e][-1]["validation"]})
        log.info("%s: %s", precision, results[-1])
    return results


def compare_losses(steps: int, device, work: Path, seed: int) -> list[dict]:
    """Dense screening for `steps` steps on the same stream with the class-balanced loss over every background
    position, and with only the hardest ones; both scored on the same validation regions."""
    results = []
    for hard in (0, 2048):
        schedule = STREAM_SCHEDULES["full"]
        schedule = replace(schedule, hard_negatives=hard, validate_every=steps)
        cast, _ = dense.autocast(device, "auto")
        validation = streamed.validation_regions(work, seed, schedule.validation_regions, 1, (0.49, 0.49, 0.8))
        torch.manual_seed(seed)
        stage = streamed.ScreeningStage(ScreeningFCN(), schedule, device, cast)
        folder = work / f"losses_hard{hard}_{steps}"
        folder.mkdir(parents=True, exist_ok=True)
        history = streamed.run_stage(stage, steps, schedule, seed, folder, device, 1, (0.49, 0.49, 0.8), validation,
                                     cast)
        final = [e for e in history if "validation" in e][-1]["validation"]
        results.append({"hard_negatives": hard, "steps": steps, **final})
        log.info("hard_negatives %d: %s", hard, final)
    return results


def score(weights: Path, device, work: Path, seed: int, count: int) -> dict:
    """Screening and discrimination figures of the weights in `weights` on the validation regions a streamed run
    with this seed uses (`streamed.validation_regions`): the same crops, the same metrics as its learning curve."""
    from ..core.three_stage import ThreeStagePipeline

    pipeline = ThreeStagePipeline.from_weights(weights, str(device))
    cast, precision = dense.autocast(device, "auto")
    validation = streamed.validation_regions(work, seed, count, 1, tuple(pipeline.config.target_spacing))
    mining = functools.partial(streamed.screening_probabilities, pipeline.screening, device=device, cast=cast)
    sited = [(r, streamed.region_sites(r, streamed.region_rng(r), mining)) for r in validation]
    result = {"weights": str(weights), "version": pipeline.weights_info["version"], "precision": precision,
              "screening": streamed.screening_metrics(pipeline.screening, validation, device, cast),
              "discrimination": streamed.discrimination_metrics(pipeline.discrimination, sited, device, cast),
              "segmentation": streamed.segmentation_metrics(pipeline.segmentation, sited, device, cast)}
    log.info("%s: %s", weights, json.dumps(result))
    return result


def candidates(work: Path, scans: list[Path], weights: Path, seed: int, count: int) -> dict:
    """Candidates per scan from the shipped screening at its threshold and from the kept screening state of the
    streamed run in `work` (finished or not) at the threshold that run chooses (`choose_screening_threshold` on
    its validation regions, as training does when screening ends): does the new network's candidate count, and so
    the discrimination stage's time, grow?"""
    from ..core.imageio import read_scan
    from ..core.preprocess import preprocess
    from ..core.three_stage import ThreeStagePipeline

    saved = torch.load(work / "screening.ckpt", map_location="cpu", weights_only=False)
    state = (saved["best"] or {}).get("model") or saved["model"]
    shipped = ThreeStagePipeline.from_weights(weights, "cpu", precision="auto", runtime="auto")
    new = ThreeStagePipeline.from_weights(weights, "cpu", precision="auto", runtime="auto")
    new.screening.load_state_dict(state)
    new.screening.eval()
    new.networks_changed("screening")
    cast, _ = dense.autocast(torch.device("cpu"), "auto")
    validation = streamed.validation_regions(work, seed, count, 1, tuple(new.config.target_spacing))
    new.config.screening_threshold = streamed.choose_screening_threshold(new.screening, validation, "cpu", cast,
                                                                         STREAM_SCHEDULES["full"].false_peaks_per_region)["threshold"]
    rows = []
    for scan in scans:
        pre = preprocess(read_scan(scan), shipped.config.target_spacing)
        row: dict = {"scan": str(scan)}
        for name, pipeline in (("shipped", shipped), ("new", new)):
            started = time.perf_counter()
            found = pipeline.find_candidates(pipeline.screen(pre.array, pre.foreground))
            row[name] = {"candidates": len(found), "threshold": pipeline.config.screening_threshold,
                         "seconds": round(time.perf_counter() - started, 1)}
        log.info("%s: %s", scan, row)
        rows.append(row)
    total = {name: sum(r[name]["candidates"] for r in rows) for name in ("shipped", "new")}
    return {"work": str(work), "kept_step": (saved["best"] or {}).get("step"), "scans": rows, "total": total}


CURVE_METRICS = {"screening": ("froc", "recall@1fp", "fp_per_region@0.5"),
                 "discrimination": ("sensitivity", "mined_kept", "mimic_kept", "kept_at_recall"),
                 "segmentation": ("dice", "negative_voxels")}


def curves(work: Path, figure: Path) -> dict:
    """The learning curves of the streamed run in `work` (its checkpoints, finished or not) as a figure: per stage,
    the training loss (mean of 50 steps) and the validation loss and figures, against wall time in hours; a dotted
    line marks the kept state."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = {name: torch.load(work / f"{name}.ckpt", map_location="cpu", weights_only=False)
             for name in streamed.STAGES if (work / f"{name}.ckpt").is_file()}
    stages = {name: state["history"] for name, state in saved.items()}
    if not stages:
        raise SystemExit(f"{work}: no stage checkpoint (screening.ckpt, ...)")
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.2 * len(stages)), squeeze=False)
    summary, offset = {}, 0.0
    for row, (name, history) in zip(axes, stages.items()):
        curve = streamed.learning_curve(history, (saved[name]["best"] or {}).get("step"))
        clock, hours = 0.0, {}
        for entry in history:
            if "seconds" in entry:
                clock += entry["seconds"]
            hours[entry["step"]] = offset + clock / 3600
        row[0].plot([hours[e["step"]] for e in curve["training"]], [e["loss"] for e in curve["training"]],
                    label="training (50-step mean)")
        checks = curve["validation"]
        row[0].plot([hours[e["step"]] for e in checks], [e["validation"]["loss"] for e in checks], "o-", ms=3,
                    label="validation")
        row[0].set_title(f"{name}: loss")
        row[0].set_xlabel("hours of training")
        row[0].legend(fontsize=8)
        for metric in CURVE_METRICS[name]:
            # counts (false peaks per region) on their own axis, shares (recall, sensitivity, Dice) on the left
            counted = metric.startswith("fp_") or metric == "negative_voxels"
            axis = row[1].twinx() if counted else row[1]
            axis.plot([hours[e["step"]] for e in checks], [e["validation"].get(metric, np.nan) for e in checks],
                      "s--" if counted else "o-", ms=3, color="C3" if axis is not row[1] else None,
                      label=metric)
            if axis is not row[1]:
                axis.set_ylabel(metric)
                axis.legend(loc="lower right", fontsize=8)
        row[1].set_title(f"{name}: validation ({len(checks)} checks)")
        row[1].set_xlabel("hours of training")
        row[1].legend(loc="lower left", fontsize=8)
        if curve["kept_step"] in hours:
            for axis in row:
                axis.axvline(hours[curve["kept_step"]], color="grey", lw=0.8, ls=":")
        summary[name] = {"steps": max(e["step"] for e in history), "hours": round(clock / 3600, 2),
                         "kept_step": curve["kept_step"],
                         "last_validation": checks[-1]["validation"] if checks else None}
        offset += clock / 3600
    fig.tight_layout()
    fig.savefig(figure, dpi=90)
    log.info("learning curves of %s written to %s", work, figure)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valdocmb.bench.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--regions", type=int, default=24, help="simulated regions the stages train on")
    parser.add_argument("--scans", type=int, default=3, help="whole scans simulated for the pool path's rate")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage and path")
    parser.add_argument("--losses", type=int, default=0, metavar="STEPS",
                        help="instead: compare the dense screening losses over STEPS steps each")
    parser.add_argument("--precisions", type=int, default=0, metavar="STEPS",
                        help="instead: dense screening in float32 and in bfloat16 over STEPS steps each")
    parser.add_argument("--score", type=Path, default=None, metavar="WEIGHTS",
                        help="instead: score these weights on the validation regions of a streamed run (--seed)")
    parser.add_argument("--curves", type=Path, default=None, metavar="WORK",
                        help="instead: draw the learning curves of the streamed run in WORK (with --figure)")
    parser.add_argument("--candidates", type=Path, nargs="+", default=None, metavar=("WORK", "SCAN"),
                        help="instead: candidates per scan (the SCANs after WORK) from the shipped screening and from "
                        "the streamed run in WORK")
    parser.add_argument("--figure", type=Path, default=Path("learning-curves.png"))
    parser.add_argument("--seed", type=int, default=0, help="the streamed run's seed (--score, --losses)")
    parser.add_argument("--validation-regions", type=int, default=48)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/valdocmb/bench-training")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    report: dict = {"hardware": hardware(), "device": str(device), "threads": torch.get_num_threads()}
    if args.curves:
        report["curves"] = curves(args.curves, args.figure)
    elif args.candidates:
        if len(args.candidates) < 2:
            parser.error("--candidates WORK SCAN [SCAN ...]")
        report["candidates"] = candidates(args.candidates[0], args.candidates[1:], Path("weights"), args.seed,
                                          args.validation_regions)
    elif args.score:
        report["score"] = score(args.score, device, args.work, args.seed, args.validation_regions)
    elif args.precisions:
        report["precisions"] = compare_precisions(args.precisions, device, args.work, args.seed)
    elif args.losses:
        report["losses"] = compare_losses(args.losses, device, args.work, args.seed)
    else:
        started = time.perf_counter()
        regions = [r for case in range(-(-args.regions // REGIONS_PER_CASE)) for r in make_case(11, case)]
        log.info("%d regions simulated in %.0f s", len(regions), time.perf_counter() - started)
        report["stages"] = throughput(regions, device, args.steps)
        report["simulation"] = simulation(args.scans, args.regions)
        print(f"\n{'stage':<15} {'unit':<19} {'pool /s':>10} {'s/step':>8} {'streamed /s':>12} {'s/step':>8} "
              f"{'ratio':>7}")
        for r in report["stages"]:
            print(f"{r['stage']:<15} {r['unit']:<19} {r['pool_per_s']:>10} {r['pool_s_per_step']:>8} "
                  f"{r['streamed_per_s']:>12} {r['streamed_s_per_step']:>8} {r['ratio']:>6}x")
        sim = report["simulation"]
        print(f"{'simulation':<15} {'crops per CPU-s':<19} {sim['whole_scans']['crops_per_cpu_s']:>10} {'':>8} "
              f"{sim['regions']['crops_per_cpu_s']:>12} {'':>8} {sim['ratio']:>6}x")
    print(json.dumps(report, indent=1) if args.losses or args.score or args.curves or args.precisions
          or args.candidates else "")
    if args.out:
        write_text_atomic(json.dumps(report, indent=1), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
