"""k-fold cross-validation of the three-stage pipeline with VALDO scoring (run by `valdocmb-train --folds K`).

Cases are split into K folds by subject; each fold's networks train on the other folds' sample pools (every stage,
mining included) and are scored on the fold's whole scans. Prints the per-fold table the paper shows (Dice, volume
difference, F1, count difference: means over the fold's cases, NaN ignored) and their average over folds.

Fine-tuning (`--init`, `cross_validate_finetuning`): each fold's networks start from the given weights; every case
is scored twice, by the unchanged weights with their own lesion rule and by its fold's fine-tuned networks with a
lesion rule chosen on the other cases' out-of-fold results (cross-fitted), so the gain is measured on cases that
neither the training nor the rule saw.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..core.imageio import write_pickle_atomic, write_text_atomic
from ..core.lesion_rule import LesionRule
from ..core.preprocess import DEFAULT_TARGET_SPACING
from ..core.three_stage import ThreeStageConfig, ThreeStagePipeline
from ..evaluate.scoring import pooled
from .stagewise import evaluate_stages, stage_scores
from .three_stage import carried_thresholds, networks, train_all
from .tune import choose_rule, cross_fit, score_with, with_lesions

log = logging.getLogger("valdocmb.crossval")


def fold_of(subjects: list[str], folds: int, seed: int) -> dict[str, int]:
    order = np.random.default_rng(seed).permutation(len(subjects))
    return {subjects[i]: rank % folds for rank, i in enumerate(order)}


def nan_mean(values) -> float:
    """Mean of the defined values; NaN when none is (Dice and F1 are undefined on a fold without CMBs)."""
    defined = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def cross_validate(cases, crops, folds: int, schedule, device, work: Path, seed: int,
                   target_spacing=DEFAULT_TARGET_SPACING) -> int:
    """`crops` were made at `target_spacing`; each fold's pipeline processes its test scans on that grid."""
    assignment = fold_of([c[0] for c in cases], folds, seed)
    table = []
    for fold in range(folds):
        train_crops = [c for c in crops if assignment.get(c.case, -1) != fold]  # mixed-in cases: every fold
        test_cases = [c for c in cases if assignment[c[0]] == fold]
        log.info("fold %d/%d: %d training crops, %d test cases", fold + 1, folds, len(train_crops), len(test_cases))
        nets, _ = train_all(train_crops, schedule, device, work / f"fold{fold}", seed)
        pipeline = ThreeStagePipeline(nets["screening"], nets["discrimination"], nets["segmentation"], device,
                                      config=ThreeStageConfig(target_spacing=tuple(target_spacing)))
        rows = evaluate_stages(pipeline, test_cases)
        # the fold's networks have no lesion rule of their own: score the thresholded U-Net map, every component
        scores = [stage_scores(r, LesionRule())["segmentation"] for r in rows]
        table.append({"fold": fold + 1, "cases": len(scores),
                      **{m: nan_mean([getattr(s, m) for s in scores]) for m in
                         ("dice", "volume_diff", "f1", "count_diff")}})
    print(f"{'fold':>4} {'cases':>5} {'Dice':>6} {'VolDiff':>8} {'F1':>6} {'CntDiff':>8}")
    for row in table:
        print(f"{row['fold']:>4} {row['cases']:>5} {row['dice']:6.3f} {row['volume_diff']:8.2f} {row['f1']:6.3f} "
              f"{row['count_diff']:8.2f}")
    means = {m: nan_mean([r[m] for r in table]) for m in ("dice", "volume_diff", "f1", "count_diff")}
    print(f"{'mean':>4} {'':>5} {means['dice']:6.3f} {means['volume_diff']:8.2f} {means['f1']:6.3f} "
          f"{means['count_diff']:8.2f}")
    write_text_atomic(json.dumps({"folds": table, "mean": means}, indent=1), work / "crossval.json")
    return 0


def cross_validate_finetuning(cases, crops, folds: int, schedule, device, work: Path, seed: int, target_spacing,
                              unchanged: ThreeStagePipeline, freeze_early: bool = False,
                              min_sensitivity: float = 0.9, parallel: int = 1, final_work: Path | None = None) -> dict:
    """Fine-tuning from the `unchanged` pipeline's weights (with their lesion rule), cross-validated; returns
    {"table", "rule", "cross_fitted", ...}: the per-fold figures of the unchanged and the fine-tuned weights, and the
    lesion rule chosen on every case's out-of-fold result (what the final fine-tuned weights get), with its
    cross-fitted figures. Both are scored at the unchanged pipeline's precision.

    `parallel` > 1: the folds (and, with `final_work`, the final weights on every case) are first trained and
    scored that many at a time in separate processes; the loop below then resumes from what they left."""
    assignment = fold_of([c[0] for c in cases], folds, seed)
    start = networks(unchanged)  # train_all copies them; the unchanged pipeline scores with them below
    jobs: list[tuple[set, list, Path, int | None]] = []
    for fold in range(folds):
        test_cases = [c for c in cases if assignment[c[0]] == fold]
        jobs.append(({s for s, *_ in test_cases}, test_cases, work / f"fold{fold}", fold))
    if final_work is not None:
        jobs.append((set(), [], final_work, None))
    config = fine_tuned_config(unchanged, target_spacing)
    running = _start_in_parallel(jobs, crops, parallel, schedule, device, seed, start, freeze_early,
                                 config, work) if parallel > 1 else None
    # the unchanged weights' results do not depend on the fold: computed once (and cached) for every case
    baseline = {record["subject"]: record
                for record in with_lesions(evaluate_stages(unchanged, cases, cache=_cache(work, "unchanged")))}
    for future in running or ():
        future.result()  # re-raises a process's failure
    (work / "crops.pkl").unlink(missing_ok=True)  # the processes' copy of the crops
    out_of_fold: dict[str, dict] = {}
    for fold in range(folds):
        held_out, test_cases, fold_work, _ = jobs[fold]
        train_crops = [c for c in crops if c.case not in held_out]  # mixed-in cases: every fold
        log.info("fold %d/%d: fine-tuning on %d crops, %d test cases", fold + 1, folds, len(train_crops),
                 len(test_cases))
        records = _train_and_score(train_crops, test_cases, schedule, device, fold_work, seed, start, freeze_early,
                                   config, fold)
        for record in with_lesions(records):
            record["fold"] = fold
            out_of_fold[record["subject"]] = record
    subjects = [c[0] for c in cases]
    tuned_records = [out_of_fold[s] for s in subjects]
    crossfitted, rules = cross_fit(tuned_records, folds, min_sensitivity)
    before = [score_with(baseline[s], unchanged.config.lesion_rule) for s in subjects]
    after = dict(zip(subjects, crossfitted))
    table = []
    for fold in range(folds):
        members = [s for s in subjects if assignment[s] == fold]
        table.append({"fold": fold + 1, "cases": len(members),
                      "unchanged": pooled([b for s, b in zip(subjects, before) if assignment[s] == fold]),
                      "fine_tuned": pooled([after[s] for s in members])})
    result: dict = {"table": table, "unchanged": pooled(before), "fine_tuned": pooled(crossfitted),
              "unchanged_rule": asdict(unchanged.config.lesion_rule),
              "rule": asdict(choose_rule(tuned_records, min_sensitivity)), "rule_folds": rules,
              "parent": unchanged.weights_info, "subjects": subjects}
    print(f"{'fold':>4} {'cases':>5} | {'unchanged: sens':>15} {'FP/scan':>7} {'F1':>5} | "
          f"{'fine-tuned: sens':>16} {'FP/scan':>7} {'F1':>5}")
    for row in [*table, {"fold": "all", "cases": len(subjects), "unchanged": result["unchanged"],
                         "fine_tuned": result["fine_tuned"]}]:
        u, f = row["unchanged"], row["fine_tuned"]
        print(f"{row['fold']:>4} {row['cases']:>5} | {u['sensitivity']:15.3f} {u['fp_per_scan']:7.2f} {u['f1']:5.3f} | "
              f"{f['sensitivity']:16.3f} {f['fp_per_scan']:7.2f} {f['f1']:5.3f}")
    write_text_atomic(json.dumps(result, indent=1, default=float).replace("NaN", "null"),
                      work / "finetune_crossval.json")
    return result


def fine_tuned_config(unchanged: ThreeStagePipeline, target_spacing) -> ThreeStageConfig:
    """How the fine-tuned folds are scored: the unchanged pipeline's precision and thresholds, every component kept
    (the lesion rule is chosen on their out-of-fold results)."""
    carried = carried_thresholds(unchanged)
    return ThreeStageConfig(target_spacing=tuple(target_spacing), precision=unchanged.config.precision,
                            screening_threshold=carried["screening_threshold"],
                            discrimination_threshold=carried["discrimination_threshold"])


def _train_and_score(train_crops, test_cases, schedule, device, work: Path, seed: int, start: dict,
                     freeze_early: bool, config: ThreeStageConfig, fold: int | None) -> list[dict]:
    """One fold: its networks fine-tuned from `start` (resuming from the checkpoints under `work`) and its test
    cases' records (cached under `work`/evaluation). `fold` None: the final weights, trained only."""
    nets, _ = train_all(train_crops, schedule, device, work, seed, init=start, freeze_early=freeze_early)
    if fold is None:
        return []
    tuned = ThreeStagePipeline(nets["screening"], nets["discrimination"], nets["segmentation"], device,
                               config=config)   # the pipeline takes a copy
    # cached fold records name the thresholds too: records scored at other thresholds are made again
    tuned.weights_info = {"version": f"fine-tuned-fold{fold + 1}-thresholds-{config.screening_threshold:.4g}-"
                                     f"{config.discrimination_threshold:.4g}"}
    return evaluate_stages(tuned, test_cases, cache=_cache(work, "evaluation"))


def _parallel_job(job) -> None:
    crops_file, held_out, test_cases, work, fold, options = job
    torch.set_num_threads(2)  # processes run side by side
    crops = [c for c in pickle.loads(crops_file.read_bytes()) if c.case not in held_out]
    _train_and_score(crops, test_cases, work=work, fold=fold, **options)


def _start_in_parallel(jobs, crops, parallel: int, schedule, device, seed, start, freeze_early,
                       config: ThreeStageConfig, work: Path):
    """Run `jobs` ((held-out subjects, test cases, work folder, fold) each) `parallel` at a time in processes of
    their own; returns their futures."""
    crops_file = work / "crops.pkl"  # one copy on disk that every process reads, rather than one per job in a pipe
    work.mkdir(parents=True, exist_ok=True)
    write_pickle_atomic(crops, crops_file)
    options = dict(schedule=schedule, device=str(device), seed=seed,
                   start={k: copy.deepcopy(v).cpu() for k, v in start.items()},  # pickled to the processes
                   freeze_early=freeze_early, config=config)
    log.info("training %d fold(s) %d at a time in separate processes", len(jobs), parallel)
    # spawned, never forked: a child forked from a process whose torch thread pool has run can hang
    executor = ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn"))
    futures = [executor.submit(_parallel_job, (crops_file, *job, options)) for job in jobs]
    executor.shutdown(wait=False)
    return futures


def _cache(work: Path, name: str) -> Path:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder
