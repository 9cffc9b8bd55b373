"""The GPU proof: both methods on CUDA in every precision mode, each mask compared with the CPU float32 one.

    python -m valdocmb.bench.gpu [--scan FILE ...] [--simulate rss] [--weights weights] [--json FILE] [--no-nnunet]

Scans: the example and a simulated 512x512x192 case (0.49x0.49x0.8 mm, `rss`; needs `.[sim]`) unless told
otherwise. For each scan, first the CPU float32 reference of each method, then every CUDA variant (three-stage in
float32, tf32, float16 and bfloat16; nnU-Net without and with mirroring), each in a fresh process
(`valdocmb-benchmark`'s `run_variant`: weights loaded apart, the same path as `process.py`). The table gives seconds
end to end and per stage, peak GPU memory and the mask voxels that differ from the CPU float32 mask of the same
method. Run it first whenever a GPU is lent (minutes), and put its table in docs/results.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..core.imageio import write_text_atomic
from ..core.logs import setup_logging
from ..core.weights import default_weights_dir
from .three_stage import EXAMPLE, run_variant, simulated_scan

REFERENCES = {"three-stage": "three-stage:float32", "nnunet": "nnunet"}
CUDA_VARIANTS = ("three-stage:float32", "three-stage:tf32", "three-stage:float16", "three-stage:bfloat16",
                 "nnunet", "nnunet:mirroring")


def in_fresh_process(scan: Path, variant: str, weights: Path, device: str, mask_out: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_variant, str(scan), variant, str(weights), device, None, str(mask_out)).result()


def compared(row: dict, mask: np.ndarray, reference: np.ndarray | None) -> dict:
    """The row with the voxels its mask has that the CPU float32 mask has not, and the other way round."""
    if reference is None:
        return {**row, "only_here": None, "only_on_cpu": None}
    return {**row, "only_here": int((mask & ~reference).sum()), "only_on_cpu": int((reference & ~mask).sum())}


def table(rows: list[dict]) -> str:
    lines = ["| scan | device | variant | seconds | load s | stages (s) | peak GPU MB | mask voxels | "
             "differ from CPU float32 (only here / only on CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        differ = "reference" if r["device"] == "cpu" else (
            "n/a" if r["only_here"] is None else f"{r['only_here'] + r['only_on_cpu']} ({r['only_here']} / "
            f"{r['only_on_cpu']})")
        lines.append(f"| {r['scan']} | {r['device']} | {r['variant']} | {r['seconds']:.1f} | {r['load_seconds']:.1f} |"
                     f" {stages} | {r['peak_gpu_mb'] if r['peak_gpu_mb'] is not None else ''} | {r['mask_voxels']} |"
                     f" {differ} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=Path, nargs="*", help="scans (default: the example scan)")
    parser.add_argument("--simulate", nargs="*", choices=("rss", "sabre", "alfa3", "alfa4"),
                        help="also simulate one case per grid (default: rss, 512x512x192)")
    parser.add_argument("--weights", type=Path, default=default_weights_dir())
    parser.add_argument("--no-nnunet", action="store_true", help="three-stage only (nnU-Net's CPU reference is slow)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("valdocmb.bench.gpu: no CUDA device here (torch.cuda.is_available() is False); run it where a GPU is "
              f"lent (torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2
    setup_logging()
    variants = [v for v in CUDA_VARIANTS if not (args.no_nnunet and v.startswith("nnunet"))]
    methods = sorted({v.split(":")[0] for v in variants})
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="valdocmb-gpu-") as scratch_name:
        scratch = Path(scratch_name)
        scans = list(args.scan) if args.scan is not None else [EXAMPLE]
        grids = args.simulate if args.simulate is not None else (["rss"] if args.scan is None else [])
        scans += [simulated_scan(grid, scratch) for grid in grids]
        for scan in scans:
            references: dict[str, np.ndarray] = {}
            runs = [("cpu", REFERENCES[m]) for m in methods] + [("cuda", v) for v in variants]
            for index, (device, variant) in enumerate(runs):
                mask_out = scratch / f"{scan.name}-{index}.npy"
                row = in_fresh_process(scan, variant, args.weights, device, mask_out)
                mask = np.load(mask_out)
                method = variant.split(":")[0]
                if device == "cpu":
                    references[method] = mask
                row = compared({**row, "scan": scan.name, "device": device}, mask,
                               None if device == "cpu" else references.get(method))
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    if args.json:
        write_text_atomic(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                      "rows": rows}, indent=1), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
