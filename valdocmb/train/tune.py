"""Choose the three-stage pipeline's lesion rule on labelled cases, and measure it honestly by cross-fitting.

    valdocmb-stagewise --data DIR --cache RUNS/records     # once: every case's component evidence
    valdocmb-tune --cache RUNS/records [--folds 5] [--min-sensitivity 0.9] [--record]

A rule (`valdocmb.core.lesion_rule.LesionRule`) keeps a component of the thresholded U-Net map when its highest
probability, its volume, its best discrimination score and its mean probability reach four minima. Every rule on a
grid of minima is scored on the cached evidence by the one scoring core (exactly as `valdocmb-evaluate` scores the
filtered mask); the chosen rule has the highest pooled F1 among those keeping pooled sensitivity >= --min-sensitivity
(the highest pooled F1 when none does; an undefined F1, on cases without any CMB or detection, ranks last); of equal
rules, the one with the lowest probability minimum, then volume, discrimination and mean probability minimum.

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
import math
import sys
from dataclasses import asdict
from pathlib import Path

from ..core import manifest
from ..core.imageio import write_text_atomic
from ..core.lesion_rule import MANIFEST_KEY, LesionRule
from ..core.logs import setup_logging
from ..core.report import Lesion
from ..core.weights import default_weights_dir
from ..evaluate.folders import format_table
from ..evaluate.scoring import EVIDENCE_VERSION, CaseScore, pooled, score_components, summarize

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
        if record.get("evidence", {}).get("version") != EVIDENCE_VERSION:
            raise SystemExit(f"{cache}: {record.get('subject')}'s record holds scoring evidence of another version; "
                             f"run `valdocmb-stagewise --cache {cache}` again (it redoes such cases)")
    return with_lesions(records)


def with_lesions(records: list[dict]) -> list[dict]:
    """The records with their lesion tables as `Lesion`s, which the rules read."""
    for record in records:
        record["lesion_objects"] = [Lesion(**lesion) for lesion in record["lesions"]]
    return records


def score_with(record: dict, rule: LesionRule) -> CaseScore:
    kept = [rule.keeps(lesion) for lesion in record["lesion_objects"]]
    return score_components(record["evidence"], kept, record["subject"])


def rank(figures: dict) -> float:
    """Pooled F1, with an undefined one (nothing to find, nothing found) last."""
    return -math.inf if math.isnan(figures["f1"]) else figures["f1"]


def choose_rule(records: list[dict], min_sensitivity: float, rules: list[LesionRule] | None = None) -> LesionRule:
    """The rule with the highest pooled F1 among those reaching min_sensitivity (else among all rules)."""
    rules = rules or candidate_rules()
    figures = [(pooled([score_with(r, rule) for r in records]), rule) for rule in rules]
    eligible = [item for item in figures if item[0]["sensitivity"] >= min_sensitivity] or figures
    # max() keeps the first of equals: rules are listed by probability, then volume, discrimination, mean minimum
    return max(eligible, key=lambda item: rank(item[0]))[1]


def cross_fit(records: list[dict], folds: int, min_sensitivity: float) -> tuple[list[CaseScore], list[dict]]:
    """Each case scored with the rule chosen on the other folds; (scores in the records' order, one entry per fold)."""
    folds = max(1, min(folds, len(records)))
    scores: dict[int, CaseScore] = {}
    chosen: list[dict] = []
    for fold in range(folds):
        held = [i for i in range(len(records)) if i % folds == fold]
        train = [records[i] for i in range(len(records)) if i % folds != fold] or [records[i] for i in held]
        rule = choose_rule(train, min_sensitivity)
        for i in held:
            scores[i] = score_with(records[i], rule)
        chosen.append({"fold": fold, "scored": [records[i]["subject"] for i in held], "rule": asdict(rule)})
        log.info("fold %d: rule %s chosen on %d case(s), scored on %d", fold, asdict(rule), len(train), len(held))
    return [scores[i] for i in range(len(records))], chosen


def summaries_by_grid(records: list[dict], scores: list[CaseScore]) -> dict:
    grids = sorted({r["grid"] for r in records})
    out = {}
    for grid in grids + (["all"] if len(grids) > 1 else []):
        subset = [s for r, s in zip(records, scores) if grid == "all" or r["grid"] == grid]
        out[grid] = summarize(subset)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-tune", description=__doc__.split("\n\n")[0])
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
        log.error("%s: no case records (run `valdocmb-stagewise --cache %s` first)", args.cache, args.cache)
        return 2
    log.info("%d case(s) from %s, %d candidate rules", len(records), args.cache, len(candidate_rules()))

    unfiltered = [score_with(r, LesionRule()) for r in records]
    crossfitted, folds = cross_fit(records, args.folds, args.min_sensitivity)
    rule = choose_rule(records, args.min_sensitivity)
    in_sample = [score_with(r, rule) for r in records]
    result: dict = {
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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(json.loads(json.dumps(result, default=float).replace("NaN", "null")),
                                     indent=1), args.json)
    if args.record:
        weights = args.weights or default_weights_dir()
        from ..core.three_stage import weights_version  # torch: imported once --help is past

        version = weights_version(weights)
        other = sorted({str(r.get("weights")) for r in records} - {version})
        if other:
            log.error("%s: records made with weights %s, not with %s (%s); the rule was not recorded", args.cache,
                      ", ".join(other), weights, version)
            return 2
        entry = {**result["rule"], "command": manifest.command_line("valdocmb-tune", argv),
                 "chosen_on": str(args.cache),
                 "weights": version, **{k: v for k, v in result.items() if k != "rule"}}
        manifest.update(weights, lambda content: content.update({MANIFEST_KEY: entry}))
        log.info("lesion rule %s recorded in %s", result["rule"], manifest.manifest_path(weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
