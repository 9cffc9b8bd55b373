"""The container's job: find the cases in the input folder, segment each, write masks, report per case.

A broken scan never costs the other cases their results: each case's error is logged with the file's name,
recorded (in results.json for the VALDO layout), and the process exits 1 at the end if any case failed.
Exit codes: 0 all cases written, 1 some case failed, 2 the run could not start (bad folder, bad method).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import __version__
from . import report
from .errors import CaseError
from .imageio import (LABELS_SUFFIX, PROBABILITY_SUFFIX, image_extension, image_like, read_scan, same_geometry,
                      write_image_atomic, write_text_atomic)
from .layouts import GC_DEFAULT_OUTPUT_PATH, LAYOUTS, Case, discover, valdo_results_entry
from .logs import setup_logging
from .defaults import NNUNET_MIRRORING, NNUNET_TILE_STEP
from .methods import NAMES as METHODS
from .offline import no_network
from .qc import overview_html, qc_png
from .result import SegmentationResult
from .weights import default_weights_dir

log = logging.getLogger("valdocmb")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="process.py", description="Cerebral microbleed segmentation (VALDO Task 2)")
    parser.add_argument("--input", type=Path, default=Path(env("CMB_INPUT", "/input")), help="input folder")
    parser.add_argument("--output", type=Path, default=Path(env("CMB_OUTPUT", "/output")), help="output folder")
    parser.add_argument("--layout", choices=LAYOUTS, default=env("CMB_LAYOUT", "auto"),
                        help="input layout (default: detected)")
    parser.add_argument("--method", choices=METHODS, default=env("CMB_METHOD", "three-stage"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=env("CMB_DEVICE", "auto"))
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights folder (default: /opt/ml/model when present, else the baked-in weights/)")
    parser.add_argument("--input-socket", default=None, help="grand-challenge: slug of the T2* image socket")
    parser.add_argument("--output-socket-path", default=GC_DEFAULT_OUTPUT_PATH,
                        help="grand-challenge: relative path of the output mask socket")
    parser.add_argument("--reports", choices=("auto", "on", "off"), default=env("CMB_REPORTS", "auto"),
                        help="lesion tables, labelled masks, QC pictures, summary.csv and index.html "
                        "(auto: on for a plain folder, off in the grand-challenge layouts)")
    parser.add_argument("--probability", action="store_true", help="also write each scan's probability map")
    parser.add_argument("--lesion-rule", choices=("weights", "off"), default=env("CMB_LESION_RULE", "weights"),
                        help="three-stage: drop faint, tiny or weakly confirmed components by the rule stored with "
                        "the weights (default), or keep every component of the thresholded map (off)")
    parser.add_argument("--nnunet-tile-step", type=float, default=NNUNET_TILE_STEP,
                        help="nnU-Net sliding-window step as a fraction of the patch (default %(default)s)")
    parser.add_argument("--nnunet-mirroring", action=argparse.BooleanOptionalAction, default=NNUNET_MIRRORING,
                        help="nnU-Net test-time mirroring (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def load_method(name: str, weights_dir: Path, device: str, nnunet_options: dict | None = None,
                lesion_rule: bool = True):
    """The segmenter for `name`: an object with segment(image, timings) -> SegmentationResult."""
    from .methods import load  # imported here so `--help` and I/O errors need no torch

    return load(name, weights_dir, device, nnunet_options, lesion_rule)


def process_case(case: Case, method, timings: dict) -> tuple[sitk.Image, SegmentationResult]:
    image = read_scan(case.input_path)
    size, spacing = image.GetSize(), tuple(round(s, 3) for s in image.GetSpacing())
    log.info("  input %s, spacing %s mm", "x".join(map(str, size)), spacing)
    result = method.segment(image, timings)
    mask = result.mask
    if not same_geometry(mask, image):
        raise CaseError(f"{case.input_path}: the method returned a mask whose geometry differs from the input "
                        "(not written)")
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    if mask.GetPixelID() != sitk.sitkUInt8 or not set(values.tolist()) <= {0, 1}:
        raise CaseError(f"{case.input_path}: the method returned a non-binary mask (values {values[:5].tolist()}; "
                        "not written)")
    write_image_atomic(mask, case.output_path)
    return image, result


def sibling(mask_path: Path, suffix: str, ext: str | None = None) -> Path:
    """A file next to a mask: <mask stem><suffix><ext> (ext defaults to the mask's)."""
    mask_ext = image_extension(mask_path) or ""
    return mask_path.with_name(mask_path.name[: len(mask_path.name) - len(mask_ext)] + suffix + (ext or mask_ext))


def write_reports(case: Case, image: sitk.Image, result: SegmentationResult, args, layout: str, row: dict) -> None:
    """Per-case extras: lesion table (CSV, JSON), labelled mask, QC picture, probability map, GC value outputs."""
    labels, lesions = report.lesion_table(result)
    row.update(cmb_count=len(lesions), total_volume_mm3=round(sum(l.volume_mm3 for l in lesions), 3))
    if layout == "gc":  # value sockets: the count and the lesion list
        write_text_atomic(json.dumps(len(lesions)), args.output / "number-of-cerebral-microbleeds.json")
        write_text_atomic(report.lesions_json(lesions, case.case_id), args.output / "cerebral-microbleeds.json")
    if reports_on(args, layout):
        write_text_atomic(report.lesions_csv(lesions), sibling(case.output_path, "_lesions", ".csv"))
        write_text_atomic(report.lesions_json(lesions, case.case_id), sibling(case.output_path, "_lesions", ".json"))
        write_image_atomic(image_like(labels, image), sibling(case.output_path, LABELS_SUFFIX))
        picture = qc_png(image, labels, lesions, args.output / "qc" / f"{case.case_id}.png", case.case_id)
        row["qc"] = str(picture.relative_to(args.output))
    if args.probability and result.probability is not None:
        write_image_atomic(result.probability, sibling(case.output_path, PROBABILITY_SUFFIX))


def reports_on(args, layout: str) -> bool:
    return args.reports == "on" or (args.reports == "auto" and layout == "folder")


def run(args: argparse.Namespace, method=None) -> int:
    started, start_time = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    try:
        layout, cases = discover(args.input, args.output, args.layout, args.input_socket, args.output_socket_path)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    runnable = [c for c in cases if c.error is None]
    log.info("valdocmb %s: %d case(s) in %s (layout %s), method %s", __version__, len(cases), args.input,
             layout, args.method)

    if method is None and runnable:
        weights = args.weights or default_weights_dir()
        try:
            method = load_method(args.method, weights, args.device,
                                 {"tile_step": args.nnunet_tile_step, "mirroring": args.nnunet_mirroring},
                                 args.lesion_rule == "weights")
        except CaseError as exc:
            log.error("cannot start method %s: %s", args.method, exc)
            return 2

    results, rows, case_records, method_info, failed = [], [], [], {}, 0
    for index, case in enumerate(cases, 1):
        start = time.perf_counter()
        log.info("[%d/%d] %s", index, len(cases), case.case_id)
        error = case.error
        timings: dict = {}
        row = {"case": case.case_id, "input": str(case.input_path or ""), "mask": str(case.output_path or ""),
               "method": args.method}
        if error is None:
            try:
                image, result = process_case(case, method, timings)
                method_info = result.info or method_info
                write_reports(case, image, result, args, layout, row)
            except CaseError as exc:
                error = str(exc)
            except Exception as exc:  # a bug or an unforeseen input: report it for this case and go on
                log.debug("%s", traceback.format_exc())
                error = f"{case.input_path}: unexpected {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        if error:
            failed += 1
            log.error("  FAILED: %s", error)
        else:
            log.info("  wrote %s (%.1f s)", case.output_path, seconds)
        row.update(status="failed" if error else "ok", error=error or "", seconds=round(seconds, 2),
                   weights=(method_info.get("weights") or {}).get("version", ""))
        rows.append(row)
        case_records.append({"case": case.case_id, "status": row["status"], "error": error,
                             "seconds": round(seconds, 2), "timings": {k: round(v, 3) for k, v in timings.items()}})
        results.append(valdo_results_entry(case, error))

    if layout == "valdo2021":
        write_text_atomic(json.dumps(results, indent=2), args.output / "results.json")
    if reports_on(args, layout):
        write_text_atomic(report.summary_csv(rows), args.output / "summary.csv")
        overview_html(rows, args.output / "index.html")
    if runnable:
        record = report.run_record(args, method_info, case_records, started, time.perf_counter() - start_time)
        write_text_atomic(json.dumps(record, indent=1, default=str), args.output / "run.json")
    log.info("done: %d of %d case(s) written, %d failed", len(cases) - failed, len(cases), failed)
    return 1 if failed else 0


def main(argv: list[str] | None = None, method=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with no_network():
        return run(args, method)


if __name__ == "__main__":
    sys.exit(main())
