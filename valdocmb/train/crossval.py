"""k-fold cross-validation of the three-stage pipeline with VALDO scoring (run by `valdocmb-train --folds K`).

Cases are split into K folds by subject; each fold's networks train on the other folds' sample pools (every stage,
mining included) and are scored on the fold's whole scans. Prints the per-fold table the paper shows (Dice, volume
difference, F1, count difference: means over the fold's cases, NaN ignored) and their average over folds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..core.lesion_rule import LesionRule
from ..core.preprocess import DEFAULT_TARGET_SPACING
from ..core.three_stage import ThreeStageConfig, ThreeStagePipeline
from .stagewise import evaluate_stages, stage_scores
from .three_stage import train_all

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
        train_crops = [c for c in crops if assignment[c.case] != fold]
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
    (work / "crossval.json").write_text(json.dumps({"folds": table, "mean": means}, indent=1))
    return 0
