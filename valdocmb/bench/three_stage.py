"""Time the methods end to end on real scans with the shipped weights, one fresh process per variant.

    valdocmb-benchmark [--scan FILE ...] [--simulate GRID ...] [--variants V ...] [--device cpu] [--threads N]
                       [--weights weights] [--json FILE]
    valdocmb-benchmark --scan A B ... --variants three-stage:openvino-bfloat16 three-stage:openvino-bfloat16@NEW

Scans: the example scan and a simulated 512x512x192 case (0.49x0.49x0.8 mm, the `rss` grid; needs `.[sim]`)
unless --scan / --simulate say otherwise. Variants (default: three-stage, three-stage:bfloat16,
three-stage:openvino-bfloat16, nnunet, nnunet:mirroring): a method, optionally with a three-stage precision on torch
(float32, bfloat16, float16, tf32) or on OpenVINO (openvino-float32, openvino-bfloat16, openvino-int8), or
nnU-Net's test-time mirroring; `@FOLDER` after a variant runs it with the weights in FOLDER instead of --weights
(old and new weights side by side in one run). Each variant runs in its own process (so its peak memory is its
own and no variant warms another's caches), loads the weights (timed apart), segments the scan through the same
path as `process.py`, and reports seconds per stage, peak memory and how many mask voxels differ from the first
variant of the same method. Ratios are to the first variant. This is a benchmark, not a test: run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..core.defaults import PRECISIONS
from ..core.imageio import write_bytes_checked, write_image_atomic, write_text_atomic
from ..core.logs import peak_memory_mb, setup_logging
from ..core.weights import default_weights_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "tests/data/example/input/sub-001_space-T2S_desc-masked_T2S.nii.gz"
DEFAULT_VARIANTS = ("three-stage", "three-stage:bfloat16", "three-stage:openvino-bfloat16", "nnunet",
                    "nnunet:mirroring")
SIMULATION_SEED = 918_273                        # a fixed case, never part of a training or hold-out set


# a variant names what ran: every precision but auto (which would depend on the machine) on torch, and the three
# OpenVINO runs (openvino-float32, openvino-bfloat16, openvino-int8)
VARIANT_OPTIONS = {"three-stage": (*(p for p in PRECISIONS if p not in ("auto", "int8")),
                                   *(f"openvino-{p}" for p in ("float32", "bfloat16", "int8"))),
                   "nnunet": ("mirroring",)}


def parse_variant(text: str) -> tuple[str, str | None]:
    """(method, option) of METHOD[:OPTION][@WEIGHTS]."""
    method, _, option = text.partition("@")[0].partition(":")
    if method not in VARIANT_OPTIONS or (option and option not in VARIANT_OPTIONS[method]):
        usage = " or ".join(f"{name}[:{'|'.join(options)}]" for name, options in VARIANT_OPTIONS.items())
        raise argparse.ArgumentTypeError(f"{text!r}: use {usage}, optionally followed by @WEIGHTS_FOLDER")
    return method, option or None


def variant_weights(text: str, default: Path) -> Path:
    """The weights folder a variant names after `@`, else `default`."""
    folder = text.partition("@")[2]
    return Path(folder).expanduser() if folder else default


def run_variant(scan: str, variant: str, weights: str, device: str, threads: int | None, mask_out: str) -> dict:
    """One variant on one scan, in a fresh process: load, segment, measure."""
    import SimpleITK as sitk
    import torch

    from ..core.device import cpu_threads
    from ..core.imageio import read_scan
    from ..core.methods import MethodOptions, load

    setup_logging()
    threads = cpu_threads(threads)
    method_name, option = parse_variant(variant)
    start = time.perf_counter()
    if method_name == "three-stage":
        runtime, _, precision = (option or "float32").rpartition("-")
        method = load("three-stage", Path(weights), MethodOptions(device=device, precision=precision,
                                                                  runtime=runtime or "torch"))
    else:
        options = MethodOptions(device=device, nnunet={"mirroring": option == "mirroring"})
        method = load("nnunet", Path(weights), options)
    load_seconds = time.perf_counter() - start
    image = read_scan(scan)
    on_cuda = device != "cpu" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings: dict = {}
    start = time.perf_counter()
    result = method.segment(image, timings)
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mask = sitk.GetArrayFromImage(result.mask).astype(bool)
    write_bytes_checked(lambda tmp: np.save(tmp, mask), Path(mask_out))
    return {"variant": variant, "threads": threads, "load_seconds": round(load_seconds, 2),
            "seconds": round(seconds, 2), "stages": {k: round(v, 2) for k, v in timings.items()},
            "peak_rss_mb": peak_memory_mb(),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if on_cuda else None,
            "mask_voxels": int(mask.sum()), "info": {k: v for k, v in result.info.items()
                                                     if k in ("candidates", "confirmed", "components", "kept")}}


def simulated_scan(grid: str, folder: Path) -> Path:
    try:
        from ..synth.simulate import simulate_case
    except ImportError as exc:
        raise SystemExit(f"--simulate needs the simulator's extra: pip install -e '.[sim]' ({exc})") from None

    case = simulate_case(SIMULATION_SEED, grid)
    path = folder / f"simulated-{grid}_T2S.nii.gz"
    write_image_atomic(case.image, path)
    return path


def benchmark_scan(scan: Path, variants: list[str], args, scratch: Path) -> list[dict]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(scan))
    reader.ReadImageInformation()
    print(f"\n{scan.name}: {'x'.join(map(str, reader.GetSize()))} voxels at "
          f"{'x'.join(f'{s:.3g}' for s in reader.GetSpacing())} mm, device {args.device}", flush=True)
    rows: list[dict] = []
    first_mask: dict[str, np.ndarray] = {}
    for index, variant in enumerate(variants):
        mask_out = scratch / f"{scan.name}-{index}.npy"
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            row = pool.submit(run_variant, str(scan), variant, str(variant_weights(variant, args.weights)),
                              args.device, args.threads, str(mask_out)).result()
        mask = np.load(mask_out)
        method = parse_variant(variant)[0]
        first_mask.setdefault(method, mask)
        row["voxels_differing_from_first_of_method"] = int((mask != first_mask[method]).sum())
        row["ratio_to_first"] = round(row["seconds"] / rows[0]["seconds"], 3) if rows else 1.0
        rows.append(row)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages"].items())
        print(f"  {variant:<40} {row['seconds']:7.1f} s  x{row['ratio_to_first']:<6.2f} peak {row['peak_rss_mb']} MB"
              f"{'' if row['peak_gpu_mb'] is None else ' (GPU ' + str(row['peak_gpu_mb']) + ' MB)'}  "
              f"mask {row['mask_voxels']} voxels ({row['voxels_differing_from_first_of_method']} differ)  "
              f"[{stages}] {row['info'] or ''}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=Path, nargs="*", help="scans to time (default: the example scan)")
    parser.add_argument("--simulate", nargs="*", choices=("rss", "sabre", "alfa3", "alfa4"),
                        help="also simulate one case per grid (default: rss, 512x512x192)")
    parser.add_argument("--variants", type=str, nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="CPU threads (default: the CPUs this process may use)")
    parser.add_argument("--weights", type=Path, default=default_weights_dir())
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for variant in args.variants:
        try:
            parse_variant(variant)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        if not variant_weights(variant, args.weights).is_dir():
            parser.error(f"{variant!r}: no weights folder {variant_weights(variant, args.weights)}")
    setup_logging()
    scans = list(args.scan) if args.scan is not None else [EXAMPLE]
    grids = args.simulate if args.simulate is not None else (["rss"] if args.scan is None else [])
    report = {"device": args.device, "weights": str(args.weights), "scans": {}}
    with tempfile.TemporaryDirectory(prefix="valdocmb-bench-") as scratch_name:
        scratch = Path(scratch_name)
        scans += [simulated_scan(grid, scratch) for grid in grids]
        names = [scan.name for scan in scans]
        for scan in scans:   # by file name, or by path where two folders hold the same name
            report["scans"][scan.name if names.count(scan.name) == 1 else str(scan)] = benchmark_scan(
                scan, args.variants, args, scratch)
    if args.json:
        write_text_atomic(json.dumps(report, indent=1), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
