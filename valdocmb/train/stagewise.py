"""Score the three-stage pipeline after each stage on labelled cases, per acquisition grid.

    valdocmb-stagewise --data DIR [--weights weights] [--device auto] [--precision auto] [--runtime auto]
                       [--batch-norm trained|scan] [--max-cases N] [--json F]
                       [--subjects S ...] [--cache DIR] [--record]

Stage outputs scored with the VALDO rules: "screening" = every candidate after non-maximum suppression, drawn as a
sphere of --mark-radius mm (the mean annotated CMB radius, 1.5 mm); "discrimination" = the confirmed candidates,
drawn the same way; "segmentation" = the thresholded U-Net map, every component; "lesion rule" = the components the
weights' lesion rule keeps (the pipeline's final mask). Grids come from the simulator's *_sim.json
(acquisition.grid), else "all".

With --cache, each case's scores and its components' evidence (`evaluate.scoring.component_evidence`, with the
lesion table) are kept in DIR/<subject>.json: a rerun skips the cases already there (made with the same weights
and evidence version), and `valdocmb-tune` chooses a lesion rule from them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import SimpleITK as sitk

from ..core import manifest
from ..core.defaults import BATCH_NORM, PRECISIONS, RUNTIMES
from ..core.imageio import image_like, read_mask, read_scan, write_text_atomic
from ..core.lesion_rule import LesionRule
from ..core.logs import setup_logging
from ..core.methods import MethodOptions, load
from ..core.report import Lesion
from ..core.weights import default_weights_dir
from ..evaluate.folders import format_table
from ..evaluate.scoring import (
    EVIDENCE_VERSION,
    CaseScore,
    centres_index,
    component_evidence,
    label_components,
    occupied_box,
    score_case,
    score_components,
    summarize,
    xyz,
)
from .samples import find_training_cases

if TYPE_CHECKING:  # torch is imported by the method's loader, once --help is past
    from ..core.three_stage import ThreeStagePipeline

log = logging.getLogger("valdocmb.stagewise")
STAGES = ("screening", "discrimination", "segmentation", "lesion rule")


def spheres(shape, centres, spacing_zyx, radius_mm: float) -> np.ndarray:
    marks = np.zeros(shape, np.float32)
    r = np.ceil(radius_mm / np.asarray(spacing_zyx)).astype(int)
    offsets = np.argwhere(np.ones(2 * r + 1, bool)) - r
    inside = offsets[np.sum((offsets * spacing_zyx) ** 2, axis=1) <= radius_mm**2]
    for centre in centres:
        points = inside + np.asarray(centre)
        ok = np.all((points >= 0) & (points < shape), axis=1)
        marks[tuple(points[ok].T)] = 1.0
    return marks


def case_record(pipeline: ThreeStagePipeline, image: sitk.Image, reference: sitk.Image, radius_mm: float,
                distance_mm: float) -> dict:
    """Scores of the candidate stages and the evidence of every component of the thresholded map."""
    timings: dict = {}
    _, detection = pipeline.segment_with_detection(image, timings)
    pre = detection.preprocessed
    spacing_zyx = np.array(pre.grid.spacing)[::-1]
    record: dict = {"timings": timings, "candidates": len(detection.candidates),
                    "confirmed": len(detection.survivors)}
    for stage, found in (("screening", detection.candidates), ("discrimination", detection.survivors)):
        marks = spheres(pre.array.shape, [c.centre for c in found], spacing_zyx, radius_mm)
        record[stage] = asdict(score_case(reference, pre.to_original(marks, "nearest"), distance_mm=distance_mm))
    # the components as the lesion table numbers them, scored as the binary mask the pipeline writes
    components = detection.components
    assert components is not None  # segment_with_detection sets them
    mask = image_like((components > 0).astype(np.uint8), reference)
    record["evidence"] = component_evidence(reference, mask, components.transpose(2, 1, 0), len(detection.lesions),
                                            distance_mm)
    record["lesions"] = [asdict(lesion) for lesion in detection.lesions]
    record["reference_ranks"] = reference_ranks(reference, pre, detection.candidates)
    return record


RANK_DISTANCE_MM = 3.0   # a candidate this close to a microbleed's centre holds it in its patches


def reference_ranks(reference: sitk.Image, pre, candidates) -> list[dict]:
    """Per reference microbleed (26-connected component): the rank (1 = highest screening score) of the first
    candidate within RANK_DISTANCE_MM of its centre and that candidate's score; None where no candidate is. A
    candidate budget of K keeps exactly the microbleeds ranked K or better (`candidate_budget`)."""
    lesions = np.around(xyz(reference), 1) != 0   # the reference lesions as scoring counts them
    box = occupied_box(lesions)
    labels, n = label_components(lesions[box])
    if n == 0:
        return []
    world = np.array([reference.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c))
                      for c in centres_index(labels, n, [b.start for b in box])])
    found = pre.voxel_to_world(np.array([c.centre for c in candidates], float).reshape(-1, 3))
    ranks = []
    for point in world:
        near = np.flatnonzero(np.linalg.norm(found - point, axis=1) <= RANK_DISTANCE_MM)
        ranks.append({"rank": int(near[0]) + 1, "screening_score": candidates[near[0]].screening_score}
                     if len(near) else {"rank": None, "screening_score": None})
    return ranks


def candidate_budget(records: list[dict], budgets=(250, 500, 750, 1000, 1500, 2000)) -> list[dict]:
    """What a cap of K candidates per scan would cost on scored cases (records with `reference_ranks`): the
    microbleeds screening holds (a candidate near them) within the cap, and the candidates per scan the later stages
    would see. An upper bound on what the cap loses: a microbleed held may still be lost after screening."""
    cases = [r for r in records if "reference_ranks" in r]
    ranks = [entry["rank"] for r in cases for entry in r["reference_ranks"]]
    rows = []
    for budget in budgets:
        rows.append({"budget": budget, "cases": len(cases), "microbleeds": len(ranks),
                     "held": sum(rank is not None and rank <= budget for rank in ranks),
                     "candidates_per_scan": float(np.mean([min(r["candidates"], budget) for r in cases]))
                     if cases else math.nan,
                     "scans_capped": sum(r["candidates"] > budget for r in cases)})
    return rows


def smallest_lossless_budget(rows: list[dict]) -> int | None:
    """The smallest cap of `candidate_budget` rows that holds every microbleed the largest cap holds; None without
    microbleeds."""
    if not rows or not rows[0]["microbleeds"]:
        return None
    largest = max(rows, key=lambda row: row["budget"])
    return min(row["budget"] for row in rows if row["held"] >= largest["held"])


def stage_scores(record: dict, rule: LesionRule) -> dict:
    """CaseScore per stage; the last two come from the component evidence."""
    subject = record["subject"]
    scores = {stage: CaseScore(**{**record[stage], "subject": subject}) for stage in STAGES[:2]}
    scores["segmentation"] = score_components(record["evidence"], None, subject)
    kept = [rule.keeps(Lesion(**lesion)) for lesion in record["lesions"]]
    scores["lesion rule"] = score_components(record["evidence"], kept, subject)
    return scores


def grid_of(scan: Path, subject: str) -> str:
    sim = scan.with_name(f"{subject}_space-T2S_sim.json")
    return json.loads(sim.read_text())["acquisition"]["grid"] if sim.is_file() else "all"


def batch_norm_of(pipeline) -> str:
    return "scan" if pipeline.config.adapt_batch_norm else "trained"


def evaluate_stages(pipeline, cases, radius_mm: float = 1.5, distance_mm: float = 5.0,
                    cache: Path | None = None) -> list[dict]:
    """One record per case (see `case_record`), read from the cache when it has the case."""
    from ..core.three_stage import ThreeStageConfig  # torch: the pipeline has imported it already
    records = []
    for i, (subject, scan, label) in enumerate(cases, 1):
        cached = cache / f"{subject}.json" if cache else None
        if cached and cached.is_file():
            record = json.loads(cached.read_text())
            # records from before the cap was recorded were all made with the default cap
            made_with = (record.get("weights"), record.get("evidence", {}).get("version"),
                         record.get("batch_norm", "trained"),
                         record.get("max_candidates", ThreeStageConfig.max_candidates))
            if made_with == (pipeline.weights_info.get("version"), EVIDENCE_VERSION, batch_norm_of(pipeline),
                             pipeline.config.max_candidates):
                records.append(record)
                log.info("[%d/%d] %s: from %s", i, len(cases), subject, cached)
                continue
            log.warning("[%d/%d] %s: %s was made with other weights, scoring, batch norm or candidate cap (%s, "
                        "evidence version %s, %s, %s); running it again", i, len(cases), subject, cached, *made_with)
        start = time.perf_counter()
        record = case_record(pipeline, read_scan(scan), read_mask(label, cast=False), radius_mm, distance_mm)
        record.update(subject=subject, grid=grid_of(scan, subject), seconds=time.perf_counter() - start,
                      weights=pipeline.weights_info.get("version"), batch_norm=batch_norm_of(pipeline),
                      max_candidates=pipeline.config.max_candidates)
        scores = stage_scores(record, pipeline.config.lesion_rule)
        s, r = scores["segmentation"], scores["lesion rule"]
        log.info("[%d/%d] %s %s: ref %d, cand %d, conf %d, seg %d (TP %d FP %d), rule %d (TP %d FP %d)  %.1f s",
                 i, len(cases), subject, record["grid"], s.n_ref, scores["screening"].n_pred,
                 scores["discrimination"].n_pred, s.n_pred, s.tp, s.fp, r.n_pred, r.tp, r.fp, record["seconds"])
        if cached:
            write_text_atomic(json.dumps(record, default=float), cached)
        records.append(record)
    return records


def report(records: list[dict], rule: LesionRule) -> dict:
    out: dict = {}
    grids = sorted({r["grid"] for r in records})
    scored = [stage_scores(r, rule) for r in records]
    for grid in grids + (["all"] if len(grids) > 1 else []):
        subset = [(r, s) for r, s in zip(records, scored) if grid == "all" or r["grid"] == grid]
        out[grid] = {"cases": len(subset), "seconds_per_case": float(np.mean([r["seconds"] for r, _ in subset]))}
        for stage in STAGES:
            scores = [s[stage] for _, s in subset]
            out[grid][stage] = summarize(scores)
            print(f"\n=== grid {grid} ({len(subset)} cases), after {stage} ===")
            print(format_table(scores, out[grid][stage]).split("\n\n", 1)[1])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-stagewise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the networks' arithmetic (default auto, as the container runs them: bfloat16 on a CPU "
                        "that has it); cached records are reused whatever precision made them")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="where the networks run (default auto, as the container runs them: OpenVINO on a CPU)")
    parser.add_argument("--batch-norm", choices=BATCH_NORM, default="trained",
                        help="batch norms as trained (default) or corrected on each scan (core/adaptation.py); "
                        "records remember which, and a cache made the other way is run again")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--subjects", nargs="+", help="only these subjects (e.g. to share the work between processes)")
    parser.add_argument("--mark-radius", type=float, default=1.5)
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--cache", type=Path, help="keep each case's record here and reuse it on a rerun")
    parser.add_argument("--record", action="store_true",
                        help="record the figures as the validation entry of the weights' MANIFEST.json")
    args = parser.parse_args(argv)
    setup_logging()
    weights = args.weights or default_weights_dir()
    pipeline = cast("ThreeStagePipeline", load("three-stage", weights, MethodOptions(
        device=args.device, precision=args.precision, runtime=args.runtime, batch_norm=args.batch_norm)))
    cases = find_training_cases(args.data)
    if args.subjects:
        cases = [case for case in cases if case[0] in set(args.subjects)]
    cases = cases[: args.max_cases]
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    records = evaluate_stages(pipeline, cases, args.mark_radius, cache=args.cache)
    rule = pipeline.config.lesion_rule
    summary = report(records, rule)
    summary["lesion_rule"] = asdict(rule)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(summary, indent=1, default=float), args.json)
    if args.record:
        validation = {
            "data": str(args.data), "subjects": [c[0] for c in cases], "device": str(pipeline.device),
            "weights": pipeline.weights_info.get("version"),
            "command": manifest.command_line("valdocmb-stagewise", argv),
            "note": "simulated hold-out cases never used in training; per grid and after each stage. The lesion rule "
                    "row applies the rule stored with the weights: when it was chosen on these same cases (tune), "
                    "that row is optimistic, and lesion_rule.cross_fitted holds the honest figures",
            "summary": summary,
        }
        manifest.update(weights, lambda content: content.update(validation=validation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
