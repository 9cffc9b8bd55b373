"""The container's job: find the cases in the input folder, segment each, write masks, report per case.

A broken scan never costs the other cases their results: each case's error is logged with the file's name,
recorded (in results.json for the VALDO layout), and the process exits 1 at the end if any case failed.
Exit codes: 0 all cases written, 1 some case failed, 2 the run could not start (bad setting, input or output folder,
method), 143 stopped by SIGTERM (130 by Ctrl-C) after recording what was done.

An output folder that already holds results: a case's earlier outputs are removed when it runs again, so what is
there afterwards is this run's (a failed case has none, never an earlier mask beside a report saying it failed);
temporary files a killed run left are removed at the start. With `--resume`, a case whose outputs are all there
already is skipped instead.

Cohorts: `--shard K/N` processes every N-th case starting at the K-th (in discovery's stable order), so N containers
or cluster array jobs split one input folder; each writes its run-wide records (summary, run.json, results.json,
index.html) under names that carry the shard, so shards can share one output folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import __version__
from . import location, methods, report
from .defaults import BATCH_NORM, INVOKE_PORT, NNUNET_MIRRORING, NNUNET_TILE_STEP, PRECISIONS, RUNTIMES
from .dicom import DEFAULT_ECHO_TIME_MS, read_series
from .errors import CaseError, RunError
from .imageio import (
    TEMPORARY_PREFIX,
    image_like,
    read_scan,
    remove_temporary_files,
    same_geometry,
    temporary_path,
    write_image_atomic,
    write_text_atomic,
)
from .layouts import GC_DEFAULT_OUTPUT_PATH, REGISTRY, Case, CaseOutcome, Layout, discover
from .layouts.bids import SCANS_TABLE, Bids
from .logs import setup_logging
from .offline import no_network
from .qc import overview_html, qc_png
from .result import SegmentationResult
from .stopping import Terminated, stop_on_sigterm, uninterrupted

log = logging.getLogger("valdocmb")


def layout_names() -> tuple[str, ...]:
    """`auto` and every registered layout (read when the options are parsed, so a layout registered later counts)."""
    return ("auto", *REGISTRY)


def env_choices() -> tuple:
    """Options that an environment variable can set too: (option, variable, choices); argparse checks only the
    flags."""
    return (("layout", "CMB_LAYOUT", layout_names()), ("method", "CMB_METHOD", methods.names()),
            ("device", "CMB_DEVICE", ("auto", "cpu", "cuda")), ("reports", "CMB_REPORTS", ("auto", "on", "off")),
            ("lesion_rule", "CMB_LESION_RULE", ("weights", "off")), ("location", "CMB_LOCATION", ("on", "off")),
            ("precision", "CMB_PRECISION", PRECISIONS), ("runtime", "CMB_RUNTIME", RUNTIMES),
            ("batch_norm", "CMB_BATCH_NORM", BATCH_NORM))


def tile_step(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction of the patch in (0, 1]")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def shard(text: str) -> tuple[int, int]:
    """K/N, 1 <= K <= N: the K-th of N shards."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 3/8)") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"{text!r}: K must be between 1 and N")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="process.py", description="Cerebral microbleed segmentation (VALDO Task 2). Called with no positional "
        "argument it reads --input and writes --output; called as a BIDS App, `process.py BIDS_DIR OUTPUT_DIR "
        "participant` processes a BIDS dataset into BIDS derivatives (`group` rebuilds the scans table of "
        "OUTPUT_DIR from what the participant runs wrote).")
    parser.add_argument("bids_dir", nargs="?", type=Path, help="BIDS App call: the BIDS dataset")
    parser.add_argument("output_dir", nargs="?", type=Path, help="BIDS App call: the derivatives folder")
    parser.add_argument("analysis_level", nargs="?", choices=("participant", "group"),
                        help="BIDS App call: participant (segment) or group (collect the scans table)")
    parser.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL",
                        help="BIDS: only these participants (01 or sub-01)")
    parser.add_argument("--session-label", nargs="+", default=None, metavar="LABEL",
                        help="BIDS: only these sessions (1 or ses-1)")
    parser.add_argument("--echo-time", type=positive_float, default=None, metavar="MS",
                        help=f"multi-echo scans (BIDS MEGRE, DICOM): read the echo nearest this echo time in ms "
                        f"(default {DEFAULT_ECHO_TIME_MS:g})")
    parser.add_argument("--input", type=Path, default=Path(env("CMB_INPUT", "/input")), help="input folder")
    parser.add_argument("--output", type=Path, default=Path(env("CMB_OUTPUT", "/output")), help="output folder")
    parser.add_argument("--layout", choices=layout_names(), default=env("CMB_LAYOUT", "auto"),
                        help="input layout (default: detected)")
    parser.add_argument("--method", choices=methods.names(), default=env("CMB_METHOD", "three-stage"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=env("CMB_DEVICE", "auto"))
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: the CPUs this process may use, within a container's "
                        "CPU quota)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights folder (default: /opt/ml/model when present, else CMB_WEIGHTS, else the "
                        "baked-in weights/)")
    parser.add_argument("--input-socket", default=None, help="grand-challenge: slug of the T2* image socket")
    parser.add_argument("--output-socket-path", default=GC_DEFAULT_OUTPUT_PATH,
                        help="grand-challenge: relative path of the output mask socket (inside the output folder)")
    parser.add_argument("--reports", choices=("auto", "on", "off"), default=env("CMB_REPORTS", "auto"),
                        help="lesion tables, labelled masks, QC pictures, summary.csv and index.html "
                        "(auto: on for a plain folder and DICOM, off for grand-challenge, VALDO 2021 and BIDS, "
                        "whose own outputs carry the counts)")
    parser.add_argument("--probability", action="store_true", help="also write each scan's probability map")
    parser.add_argument("--resume", action="store_true",
                        help="skip a case whose outputs (mask, and its reports when reports are on) all exist already, "
                        "as an interrupted run left them")
    parser.add_argument("--shard", type=shard, default=None, metavar="K/N",
                        help="process only the K-th of N interleaved parts of the input (1-based), for N containers or "
                        "array jobs on one folder; run-wide records are named after the shard")
    parser.add_argument("--lesion-rule", choices=("weights", "off"), default=env("CMB_LESION_RULE", "weights"),
                        help="three-stage: drop faint, tiny or weakly confirmed components by the rule stored with "
                        "the weights (default), or keep every component of the thresholded map (off)")
    parser.add_argument("--location", choices=("on", "off"), default=env("CMB_LOCATION", "on"),
                        help="register each scan to MNI space and give every CMB its region, MARS class and side, "
                        "with regional counts per scan (on, default, wherever lesion tables or grand-challenge value "
                        "outputs are written; about 2-5 s per scan), or skip that (off)")
    parser.add_argument("--precision", choices=PRECISIONS, default=env("CMB_PRECISION", "auto"),
                        help="three-stage networks' arithmetic: auto (default: bfloat16 on a CPU with bfloat16 "
                        "instructions, else float32), float32 (on CUDA without TF32), bfloat16 under autocast, on "
                        "CUDA float16 autocast or TF32 convolutions, or on a CPU with OpenVINO int8 (opt-in, needs "
                        "the weights' int8 calibration); see docs/results.md for what each changes")
    parser.add_argument("--runtime", choices=RUNTIMES, default=env("CMB_RUNTIME", "auto"),
                        help="where the three-stage networks run: auto (default: OpenVINO on a CPU, about 1.5x "
                        "faster at the same precision; torch on CUDA and for float16 or tf32), torch, or openvino")
    parser.add_argument("--batch-norm", choices=BATCH_NORM, default=env("CMB_BATCH_NORM", "trained"),
                        help="three-stage batch norms: as trained (default), or scan: screening's and discrimination's "
                        "corrected on each scan towards the weights' reference, a label-free adaptation to another "
                        "scanner (opt-in; needs the weights' batch-norm reference; see docs/training.md)")
    parser.add_argument("--nnunet-tile-step", type=tile_step, default=NNUNET_TILE_STEP,
                        help="nnU-Net sliding-window step as a fraction of the patch, in (0, 1] (default %(default)s)")
    parser.add_argument("--nnunet-mirroring", action=argparse.BooleanOptionalAction, default=NNUNET_MIRRORING,
                        help="nnU-Net test-time mirroring (default: %(default)s)")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction,
                        default=env("CMB_API_METHOD", "exec") == "invoke",
                        help="grand-challenge invoke mode: load the model once, then serve GET /health and POST "
                        "/invoke (each invocation processes the input folder) until stopped (default: on when "
                        "CMB_API_METHOD=invoke, as in the invoke image)")
    parser.add_argument("--host", default=env("CMB_HOST", "127.0.0.1"),
                        help="invoke mode: address to listen on (default %(default)s; 0.0.0.0 to be reached from "
                        "outside the container)")
    parser.add_argument("--port", type=positive_int, default=None,
                        help=f"invoke mode: port (default {INVOKE_PORT}, grand-challenge's, or CMB_PORT)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The options, with values from environment variables held to the same choices as the flags (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, variable, choices in env_choices():
        if getattr(args, option) not in choices:
            parser.error(f"{variable}={getattr(args, option)!r} is not one of {', '.join(choices)}")
    if os.environ.get("CMB_API_METHOD", "exec") not in ("exec", "invoke"):
        parser.error(f"CMB_API_METHOD={os.environ['CMB_API_METHOD']!r} is not one of exec, invoke")
    if args.port is None:
        try:
            args.port = positive_int(os.environ.get("CMB_PORT", str(INVOKE_PORT)))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"CMB_PORT={os.environ['CMB_PORT']!r}: {exc}")
    if args.shard is None and os.environ.get("CMB_SHARD"):
        try:
            args.shard = shard(os.environ["CMB_SHARD"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"CMB_SHARD: {exc}")
    given = [value is not None for value in (args.bids_dir, args.output_dir, args.analysis_level)]
    if any(given):
        if not all(given):
            parser.error("the BIDS App call takes all three: BIDS_DIR OUTPUT_DIR participant|group")
        args.input, args.output = args.bids_dir, args.output_dir
        if args.layout == "auto":
            args.layout = "bids"
        elif args.layout != "bids":
            parser.error(f"the BIDS App call reads a BIDS dataset; --layout {args.layout} contradicts it")
    if args.serve and args.shard is not None:
        parser.error("--shard splits a folder among exec runs; invoke mode processes what each invocation puts there")
    if args.threads is None and os.environ.get("CMB_THREADS"):
        try:
            args.threads = positive_int(os.environ["CMB_THREADS"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"CMB_THREADS={os.environ['CMB_THREADS']!r}: {exc}")
    return args


def method_from(args: argparse.Namespace):
    """The method the options ask for, loaded once (exec mode before its first case, invoke mode before it serves);
    sets torch's CPU threads. A CaseError says why it cannot start."""
    from .device import cpu_threads  # imported here so `--help` and I/O errors need no torch
    from .weights import resolve_weights_dir

    args.threads = cpu_threads(args.threads)
    args.weights = resolve_weights_dir(args.weights)
    log.info("loading %s from %s; torch uses %d CPU thread(s)", args.method, args.weights, args.threads)
    options = methods.MethodOptions(
        device=args.device, precision=args.precision, runtime=args.runtime,
        lesion_rule=args.lesion_rule == "weights", batch_norm=args.batch_norm,
        nnunet={"tile_step": args.nnunet_tile_step, "mirroring": args.nnunet_mirroring})
    return methods.load(args.method, args.weights, options)


def read_case(case: Case) -> sitk.Image:
    assert case.input_path is not None  # a case without input carries an error and is never read
    if case.series_files is not None:
        return read_series(case.series_files, case.input_path, case.details.get("series", ""))
    return read_scan(case.input_path)


def process_case(case: Case, method, timings: dict) -> tuple[sitk.Image, SegmentationResult]:
    image = read_case(case)
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
    assert case.output_path is not None
    write_image_atomic(mask, case.output_path)
    return image, result


def write_reports(case: Case, image: sitk.Image, result: SegmentationResult, args, layout: Layout, row: dict,
                  timings: dict) -> dict | None:
    """Per-case extras: the layout's own outputs (grand-challenge value sockets, BIDS sidecars and tables), lesion
    table (CSV, JSON) with each CMB's region, labelled mask, QC picture, probability map. Returns the registration's
    record for run.json (None when the CMBs were not located)."""
    labels, lesions = report.lesion_table(result)
    row.update(cmb_count=len(lesions), total_volume_mm3=round(sum(lesion.volume_mm3 for lesion in lesions), 3))
    census = location_record = None
    if args.location == "on" and (layout.always_located or reports_on(args, layout)):
        lesions, census, location_record = located(image, lesions, row, timings)
    elif args.location == "off":
        row["location"] = "off"
    layout.write_case_files(case, lesions, census, result.info or {})
    if reports_on(args, layout):
        files = layout.report_files(case)
        write_text_atomic(report.lesions_csv(lesions), files.table_csv)
        write_text_atomic(report.lesions_json(lesions, case.case_id, census), files.table_json)
        write_image_atomic(image_like(labels, image), files.labels)
        picture = qc_png(image, labels, lesions, files.picture, case.case_id)
        row["qc"] = str(picture.relative_to(args.output))
    if args.probability and result.probability is not None:
        write_image_atomic(result.probability, layout.probability_file(case))
    return location_record


def located(image: sitk.Image, lesions: list, row: dict, timings: dict) -> tuple[list, dict, dict]:
    """The lesions with their regions, the scan's regional counts (also into the summary row) and the
    registration's record. A scan with no CMB is not registered: there is nothing to place."""
    start = time.perf_counter()
    if not lesions:
        counts = location.census([], "ok")
        row.update(counts)
        return lesions, counts, {"status": "ok", "registered": False}
    placement = location.register(image)
    places = location.locate(lesions, placement)
    timings["location"] = time.perf_counter() - start
    record = placement.record()
    if not location.placed(record["status"]):
        log.warning("  regions unknown: %s (the mask is written all the same)", record["status"].split(": ", 1)[1])
    elif record["status"] != "ok":
        log.warning("  regions given but in doubt: %s", record["status"])
    else:
        log.info("  located %d CMB(s): brain overlap %.2f", len(lesions), placement.brain_overlap)
    counts = location.census(places, record["status"])
    row.update(counts)
    return [replace(lesion, **place) for lesion, place in zip(lesions, places)], counts, record


def reports_on(args, layout: Layout) -> bool:
    return args.reports == "on" or (args.reports == "auto" and layout.reports_by_default)


def case_outputs(case: Case, layout: Layout) -> list[Path]:
    """Every file a case can write: the mask, the layout's own outputs, its reports, its probability map."""
    if case.output_path is None:
        return []
    return [case.output_path, *layout.case_files(case), *layout.report_files(case).all(),
            layout.probability_file(case)]


def expected_outputs(case: Case, args, layout: Layout) -> list[Path]:
    """The files a successful run of the case leaves with these settings (a probability map only exists where the
    method makes one, so it is not required)."""
    assert case.output_path is not None
    return [case.output_path, *layout.case_files(case),
            *(layout.report_files(case).all() if reports_on(args, layout) else [])]


def done_earlier(case: Case, args, layout: Layout) -> bool:
    return case.output_path is not None and all(path.is_file() for path in expected_outputs(case, args, layout))


def earlier_counts(case: Case, args, layout: Layout, row: dict) -> None:
    """A skipped case's count, volume and QC picture, from what its earlier run wrote."""
    picture = layout.report_files(case).picture
    if picture.is_file():
        row["qc"] = str(picture.relative_to(args.output))
    row.update(layout.earlier_counts(case))


def run_file(args, name: str) -> Path:
    """A run-wide record's path: `name` in the output folder, with the shard in it when the run is one shard."""
    if args.shard is None:
        return args.output / name
    stem, dot, ext = name.partition(".")
    return args.output / f"{stem}.shard-{args.shard[0]}-of-{args.shard[1]}{dot}{ext}"


def remove_outputs(case: Case, layout: Layout, why: str) -> None:
    """Remove a case's outputs: an earlier run's before the case runs again, this run's when it fails."""
    for path in case_outputs(case, layout):
        try:
            if path.is_file():
                path.unlink()
                log.info("  removed %s (%s)", path, why)
        except OSError as exc:
            log.warning("  could not remove %s: %s", path, exc.strerror or exc)


def check_names(case: Case, args, layout: Layout) -> None:
    """Output names the file system cannot hold fail the case before any inference."""
    limit = os.pathconf(args.output, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    for path in case_outputs(case, layout):
        if len(temporary_path(path).name.encode()) > limit:  # each file is written under a longer name first
            raise CaseError(f"{case.input_path}: the output name {path.name[:40]}..., with the temporary prefix it "
                            f"is written under first, is longer than the {limit} bytes a file name may have here; "
                            "rename the scan")


def check_output(args, layout: Layout, cases: list[Case]) -> None:
    """The output folder can take the run's results, before any inference; RunError names the output otherwise."""
    output = args.output
    if output.exists() and not output.is_dir():
        raise RunError(f"{output}: is a file, not an output folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f"{TEMPORARY_PREFIX}write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"{output}: the output folder is not writable: {exc.strerror or exc}") from None
    folders = {path.parent for case in cases for path in case_outputs(case, layout)}
    for folder in sorted(folders):
        for parent in [folder, *folder.parents]:
            if parent == output or output not in parent.parents:
                break
            if parent.exists() and not parent.is_dir():
                raise RunError(f"{parent}: exists as a file where the run writes a folder")
    needed = sum(4 * sum(path.stat().st_size for path in case.series_files or [case.input_path]) + (1 << 20)
                 for case in cases if case.error is None and case.input_path is not None
                 and (case.series_files is not None or case.input_path.is_file()))
    free = shutil.disk_usage(output).free
    if free < needed:
        raise RunError(f"{output}: {free / 2**20:.0f} MB free, the run needs about {needed / 2**20:.0f} MB")
    if removed := remove_temporary_files(output, below=True):
        log.info("removed %d temporary file(s) an earlier, interrupted run left in %s", removed, output)


def collect_bids_group(args: argparse.Namespace) -> int:
    """The BIDS App's group level: the scans table of a derivatives folder that participant runs (or shards) wrote."""
    if not args.output.is_dir():
        log.error("%s: no derivatives folder to collect", args.output)
        return 2
    layout = Bids(args)
    with uninterrupted():
        layout.write_dataset_description()
        layout.write_scans_table()
    log.info("collected %s", args.output / SCANS_TABLE)
    return 0


def run(args: argparse.Namespace, method=None) -> int:
    started, start_time = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    if getattr(args, "analysis_level", None) == "group":
        return collect_bids_group(args)
    try:
        found = discover(args)
        layout, cases = found.layout, found.cases
        if args.shard is not None:
            index, count = args.shard
            cases = cases[index - 1::count]
            log.info("shard %d/%d: %d of %d case(s)", index, count, len(cases), len(found.cases))
        skipped = {case.case_id for case in cases
                   if args.resume and case.error is None and done_earlier(case, args, layout)}
        check_output(args, layout, [case for case in cases if case.case_id not in skipped])
    except RunError as exc:
        log.error("%s", exc)
        return 2
    runnable = [c for c in cases if c.error is None and c.case_id not in skipped]
    log.info("valdocmb %s: %d case(s) in %s (layout %s), method %s%s", __version__, len(cases), args.input,
             layout.name, args.method, f"; {len(skipped)} done earlier, skipped (--resume)" if skipped else "")
    for path, reason in found.ignored:
        log.info("  ignored %s: %s", path, reason)

    if method is None and runnable:
        try:
            method = method_from(args)
        except CaseError as exc:
            log.error("cannot start method %s: %s", args.method, exc)
            return 2

    outcomes: list[CaseOutcome] = []
    rows: list[dict] = []
    case_records: list[dict] = []
    method_info: dict = {}
    failed, stopped = 0, None
    first_error = None
    for index, case in enumerate(cases, 1):
        start = time.perf_counter()
        log.info("[%d/%d] %s", index, len(cases), case.case_id)
        error = case.error if stopped is None else f"not run: the run was stopped ({stopped}) before this case"
        timings: dict = {}
        location_record = None
        row = {"case": case.case_id, "input": str(case.input_path or ""), "mask": str(case.output_path or ""),
               "method": args.method}
        if error is None and case.case_id in skipped:
            log.info("  skipped: its outputs exist (--resume)")
            earlier_counts(case, args, layout, row)
            row.update(status="skipped", error="", seconds=0.0, weights="")
            rows.append(row)
            case_records.append({"case": case.case_id, "status": "skipped", "error": None, "seconds": 0.0,
                                 "timings": {}})
            outcomes.append(CaseOutcome(case, row, None))
            continue
        if error is None:
            try:
                check_names(case, args, layout)
                remove_outputs(case, layout, "an earlier run's result, replaced now")
                image, result = process_case(case, method, timings)
                method_info = result.info or method_info
                location_record = write_reports(case, image, result, args, layout, row, timings)
            except (Terminated, KeyboardInterrupt) as exc:
                stopped = str(exc) or "SIGINT"
                error = f"{case.input_path}: interrupted ({stopped})"
            except CaseError as exc:  # a method's refusal may not know the file: every case error names it
                error = str(exc) if str(case.input_path) in str(exc) else f"{case.input_path}: {exc}"
            except Exception as exc:  # a bug or an unforeseen input: report it for this case and go on
                log.debug("%s", traceback.format_exc())
                error = f"{case.input_path}: unexpected {type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - start
        if error:
            failed += 1
            first_error = first_error or error
            log.error("  FAILED: %s", error)
            remove_outputs(case, layout, "the case failed")
        else:
            log.info("  wrote %s (%.1f s)", case.output_path, seconds)
        row.update(status="failed" if error else "ok", error=error or "", seconds=round(seconds, 2),
                   weights=(method_info.get("weights") or {}).get("version", ""))
        rows.append(row)
        case_records.append({"case": case.case_id, "status": row["status"], "error": error,
                             "seconds": round(seconds, 2), "timings": {k: round(v, 3) for k, v in timings.items()},
                             "location": location_record, **({"input": case.details} if case.details else {})})
        outcomes.append(CaseOutcome(case, row, error))

    try:
        with uninterrupted():
            layout.write_records(outcomes, lambda name: run_file(args, name))
            if reports_on(args, layout):
                write_text_atomic(report.summary_csv(rows), run_file(args, "summary.csv"))
                overview_html(rows, run_file(args, "index.html"))
            if runnable:
                record = report.run_record(args, method_info, case_records, started,
                                           time.perf_counter() - start_time)
                record["ignored"] = [{"path": str(path), "reason": reason} for path, reason in found.ignored]
                record["stopped"] = stopped
                write_text_atomic(json.dumps(record, indent=1, default=str), run_file(args, "run.json"))
    except CaseError as exc:
        log.error("the run's records could not be written: %s", exc)
        return 1
    except Terminated as exc:
        stopped = stopped or str(exc)
    log.info("done: %d of %d case(s) written, %d failed%s", len(cases) - failed - len(skipped), len(cases), failed,
             f"; stopped by {stopped}" if stopped else "")
    if failed:  # the last stderr line: what grand-challenge shows as a failed job's error
        log.error("%s", first_error if failed == 1 else f"{failed} cases failed; the first: {first_error}",
                  extra={"summary": True})
    if stopped:
        return 130 if stopped == "SIGINT" else 143
    return 1 if failed else 0


def main(argv: list[str] | None = None, method=None) -> int:
    args = parse_arguments(argv)
    setup_logging(args.verbose, progress_to_stdout=True)
    if args.serve:
        from .serve import serve  # uvicorn handles SIGTERM itself: it stops accepting and ends the server

        with no_network():
            return serve(args, run, method_from)
    with no_network(), stop_on_sigterm():
        return run(args, method)


if __name__ == "__main__":
    sys.exit(main())
