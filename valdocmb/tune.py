"""Choose the three-stage pipeline's lesion rule on labelled cases, and measure it honestly by cross-fitting.

    python -m valdocmb.stagewise --data DIR --cache RUNS/records     # once: every case's component evidence
    python -m valdocmb.tune --cache RUNS/records [--folds 5] [--min-sensitivity 0.9] [--record]

A rule (`valdocmb.lesion_rule.LesionRule`) keeps a component of the thresholded U-Net map when its highest
probability, its volume, its best discrimination score and its mean probability reach four minima. Every rule on a grid of minima is
scored on the cached evidence (exactly as `evaluate.score_case` would score the filtered mask); the chosen rule has
the highest pooled F1 among those keeping pooled sensitivity >= --min-sensitivity (the highest pooled F1 when none
does); of equal rules, the one with the lowest probability minimum, then volume, discrimination and mean
probability minimum.

The figures of a rule chosen on the cases it is scored on are optimistic. Cross-fitting gives the honest ones: the
cases are split into --folds groups; each group is scored with the rule chosen on the other groups. --record
stores the rule chosen on all cases in the weights' MANIFEST.json under "lesion_rule", with the cross-fitted
figures; the pipeline applies it from then on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from .evaluate import CaseScore, format_table, score_components, summarize
from .lesion_rule import MANIFEST_KEY, LesionRule
from .logs import setup_logging
from .report import Lesion
from .run import default_weights_dir
from .three_stage import weights_version
from .weights import MANIFEST

log = logging.getLogger("valdocmb.tune")

PROBABILITY_MINIMA = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
VOLUME_MINIMA_MM3 = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
DISCRIMINATION_MINIMA = (0.0, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
MEAN_PROBABILITY_MINIMA = (0.0, 0.6, 0.7, 0.8, 0.85, 0.9)


def candidate_rules() -> list[LesionRule]:
    return [LesionRule(*minima) for minima in
            itertools.product(PROBABILITY_MINIMA, VOLUME_MINIMA_MM3, DISCRIMINATION_MINIMA, MEAN_PROBABILITY_MINIMA)]


def load_records(cache: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(Path(cache).glob("*.json"))]
    for record in records:
        record["lesion_objects"] = [Lesion(**lesion) for lesion in record["lesions"]]
    return records


def score_with(record: dict, rule: LesionRule) -> CaseScore:
    kept = [rule.keeps(lesion) for lesion in record["lesion_objects"]]
    return score_components(record["evidence"], kept, record["subject"])


def pooled(scores: list[CaseScore]) -> tuple[float, float, float]:
    """(F1, sensitivity, FP per scan) over all cases' detections together."""
    tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    sensitivity = tp / (tp + fn) if tp + fn else 1.0
    return f1, sensitivity, fp / max(len(scores), 1)


def choose_rule(records: list[dict], min_sensitivity: float, rules: list[LesionRule] | None = None) -> LesionRule:
    """The rule with the highest pooled F1 among those reaching min_sensitivity (else among all rules)."""
    rules = rules or candidate_rules()
    figures = [(pooled([score_with(r, rule) for r in records]), rule) for rule in rules]
    eligible = [item for item in figures if item[0][1] >= min_sensitivity] or figures
    # max() keeps the first of equals: rules are listed by probability, then volume, discrimination, mean minimum
    return max(eligible, key=lambda item: item[0][0])[1]


def cross_fit(records: list[dict], folds: int, min_sensitivity: float) -> tuple[list[CaseScore], list[dict]]:
    """Each case scored with the rule chosen on the other folds; (scores in the records' order, one entry per fold)."""
    folds = max(1, min(folds, len(records)))
    scores: list[CaseScore | None] = [None] * len(records)
    chosen = []
    for fold in range(folds):
        held = [i for i in range(len(records)) if i % folds == fold]
        train = [records[i] for i in range(len(records)) if i % folds != fold] or [records[i] for i in held]
        rule = choose_rule(train, min_sensitivity)
        for i in held:
            scores[i] = score_with(records[i], rule)
        chosen.append({"fold": fold, "scored": [records[i]["subject"] for i in held], "rule": asdict(rule)})
        log.info("fold %d: rule %s chosen on %d case(s), scored on %d", fold, asdict(rule), len(train), len(held))
    return scores, chosen


def summaries_by_grid(records: list[dict], scores: list[CaseScore]) -> dict:
    grids = sorted({r["grid"] for r in records})
    out = {}
    for grid in grids + (["all"] if len(grids) > 1 else []):
        subset = [s for r, s in zip(records, scores) if grid == "all" or r["grid"] == grid]
        out[grid] = summarize(subset)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m valdocmb.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="the folder `stagewise --cache` filled")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--min-sensitivity", type=float, default=0.9)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--record", action="store_true", help="store the rule in the weights' MANIFEST.json")
    args = parser.parse_args(argv)
    setup_logging()
    records = load_records(args.cache)
    if not records:
        log.error("%s: no case records (run `python -m valdocmb.stagewise --cache %s` first)", args.cache, args.cache)
        return 2
    log.info("%d case(s) from %s, %d candidate rules", len(records), args.cache, len(candidate_rules()))

    unfiltered = [score_with(r, LesionRule()) for r in records]
    crossfitted, folds = cross_fit(records, args.folds, args.min_sensitivity)
    rule = choose_rule(records, args.min_sensitivity)
    in_sample = [score_with(r, rule) for r in records]
    result = {
        "rule": asdict(rule), "cases": len(records), "subjects": [r["subject"] for r in records],
        "objective": f"highest pooled F1 with pooled sensitivity >= {args.min_sensitivity}",
        "folds": folds,
        "no_rule": summaries_by_grid(records, unfiltered),
        "cross_fitted": summaries_by_grid(records, crossfitted),
        "in_sample": summaries_by_grid(records, in_sample),
    }
    for title, scores in (("no rule (every component)", unfiltered),
                          (f"cross-fitted rule ({len(folds)} folds)", crossfitted),
                          (f"rule chosen on all cases {asdict(rule)} (in-sample, optimistic)", in_sample)):
        print(f"\n=== {title} ===")
        print(format_table(scores, summarize(scores)).split("\n\n", 1)[1])
    clean = json.loads(json.dumps(result, default=float).replace("NaN", "null"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(clean, indent=1))
    if args.record:
        weights = args.weights or default_weights_dir()
        version = weights_version(weights)
        other = sorted({str(r.get("weights")) for r in records} - {version})
        if other:
            log.error("%s: records made with weights %s, not with %s (%s); the rule was not recorded", args.cache,
                      ", ".join(other), weights, version)
            return 2
        manifest_path = weights / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
        manifest[MANIFEST_KEY] = {**clean["rule"], "command": "python -m valdocmb.tune " + " ".join(sys.argv[1:]),
                                  "chosen_on": str(args.cache), **{k: v for k, v in clean.items() if k != "rule"}}
        manifest_path.write_text(json.dumps(manifest, indent=2))
        log.info("lesion rule %s recorded in %s", clean["rule"], manifest_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
