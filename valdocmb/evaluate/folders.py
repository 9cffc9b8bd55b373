"""Pairing a reference folder with a prediction folder by subject, scoring every pair, and printing the table."""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import asdict
from pathlib import Path

from ..core.errors import CaseError
from ..core.imageio import (
    LABELS_SUFFIX,
    PROBABILITY_SUFFIX,
    image_extension,
    read_mask,
    strip_image_extension,
    write_text_atomic,
)
from .scoring import METRICS, CaseScore, missing_score, reference_count, score_case

log = logging.getLogger(__name__)

SUBJECT_ID = re.compile(r"(sub-[A-Za-z0-9]+)")
NAME_SUFFIXES = ("_prediction", "_CMB", "_cmb", "_T2S", "_space-T2S", "_desc-masked")


def is_side_output(path: Path, files: set[Path]) -> bool:
    """A component-label or probability map written next to a mask that is among `files` (see `run.sibling`)."""
    stem = strip_image_extension(path.name)
    ext = path.name[len(stem):]
    return any(stem.endswith(suffix) and path.with_name(stem[: -len(suffix)] + ext) in files
               for suffix in (LABELS_SUFFIX, PROBABILITY_SUFFIX))


def subject_id(name: str) -> str:
    """`sub-XXX` when the name has one, else the file stem without our known suffixes."""
    if m := SUBJECT_ID.search(name):
        return m.group(1)
    stem = strip_image_extension(name)
    changed = True
    while changed:
        changed = False
        for suffix in NAME_SUFFIXES:
            if stem.endswith(suffix):
                stem, changed = stem[: -len(suffix)], True
    return stem


def collect(folder: Path, prefer_labels: bool = False) -> dict[str, Path]:
    """Image files in `folder` (and its `images/` subfolder) by subject id; duplicates are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: folder not found")
    files = [p for sub in (folder, folder / "images") if sub.is_dir()
             for p in sorted(sub.iterdir()) if p.is_file() and image_extension(p) and not p.name.startswith(".")]
    present = set(files)
    files = [p for p in files if not is_side_output(p, present)]
    if prefer_labels and any("_CMB" in p.name for p in files):
        files = [p for p in files if "_CMB" in p.name]  # a VALDO training folder: labels beside the scans
    by_id: dict[str, Path] = {}
    for path in files:
        sid = subject_id(path.name)
        if sid in by_id:
            raise ValueError(f"{folder}: two files for {sid}: {by_id[sid].name} and {path.name}")
        by_id[sid] = path
    return by_id


def evaluate_folders(reference_dir: Path, prediction_dir: Path, distance_mm: float = 5.0,
                     connectivity: int = 26) -> list[CaseScore]:
    references = collect(reference_dir, prefer_labels=True)
    predictions = collect(prediction_dir)
    if not references:
        raise ValueError(f"{reference_dir}: no reference images found")
    for extra in sorted(set(predictions) - set(references)):
        log.warning("prediction %s has no reference; ignored", predictions[extra])
    scores = []
    for sid in sorted(references):
        try:
            reference = read_mask(references[sid], cast=False)
        except CaseError as exc:
            log.error("%s", exc)
            scores.append(missing_score(sid, 0, f"error: {exc}"))
            continue
        if sid not in predictions:
            log.warning("%s: no prediction; scored with worst values", sid)
            scores.append(missing_score(sid, reference_count(reference, connectivity)))
            continue
        try:
            prediction = read_mask(predictions[sid], cast=False)
            scores.append(score_case(reference, prediction, sid, distance_mm, connectivity))
        except CaseError as exc:
            log.error("%s", exc)
            scores.append(missing_score(sid, reference_count(reference, connectivity), f"error: {exc}"))
    return scores


def number(x, digits=3) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def format_table(scores: list[CaseScore], summary: dict) -> str:
    lines = [f"{'subject':<16} {'dice':>6} {'vol_diff':>10} {'f1':>6} {'cnt_diff':>8} "
             f"{'ref':>4} {'pred':>4} {'tp':>3} {'fp':>3} {'fn':>3}  status"]
    for s in scores:
        lines.append(f"{s.subject:<16} {number(s.dice):>6} {number(s.volume_diff, 1):>10} {number(s.f1):>6} "
                     f"{number(s.count_diff, 0):>8} {s.n_ref:>4} {s.n_pred:>4} {s.tp:>3} {s.fp:>3} {s.fn:>3}  "
                     f"{s.status}")
    lines.append("")
    lines.append(f"{'metric':<12} {'median':>10} {'IQR (q1 - q3)':>24}  n")
    for metric in METRICS:
        m = summary[metric]
        lines.append(f"{metric:<12} {number(m['median']):>10} {number(m['q1']):>11} - {number(m['q3']):<11} {m['n']}")
    p = summary["pooled"]
    lines.append("")
    lines.append(f"pooled over {summary['cases']} scans: TP {p['tp']}  FP {p['fp']}  FN {p['fn']}  "
                 f"sensitivity {number(p['sensitivity'])} ({p['found']} of {p['n_ref']})  "
                 f"precision {number(p['precision'])}  FP/scan {number(p['fp_per_scan'], 2)}")
    return "\n".join(lines)


def write_csv(scores: list[CaseScore], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(scores[0]).keys()) if scores else ["subject"],
                            lineterminator="\n")
    writer.writeheader()
    for s in scores:
        writer.writerow(asdict(s))
    write_text_atomic(buffer.getvalue(), path)
