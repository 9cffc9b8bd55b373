import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_three_stage import dark_blob_scan, save_fixed_weights

from valdocmb.core import run
from valdocmb.core.errors import CaseError
from valdocmb.core.lesion_rule import LesionRule, apply_rule, rule_from_manifest
from valdocmb.core.manifest import MANIFEST
from valdocmb.core.report import Lesion
from valdocmb.core.result import SegmentationResult
from valdocmb.core.three_stage import ThreeStagePipeline
from valdocmb.evaluate.scoring import EVIDENCE_VERSION, label_components, pooled
from valdocmb.train import stagewise, tune

from conftest import make_image


def lesion(max_probability=0.9, volume_mm3=5.0, discrimination=0.9):
    return Lesion(1, 0, 0, 0, 0, 0, 0, volume_mm3, 5, max_probability, max_probability, 0.5, discrimination)


def test_rule_keeps_a_lesion_only_when_every_minimum_is_reached():
    rule = LesionRule(min_probability=0.8, min_volume_mm3=2.0, min_discrimination=0.9)
    assert rule.keeps(lesion(0.8, 2.0, 0.9))
    assert not rule.keeps(lesion(0.79, 2.0, 0.9))
    assert not rule.keeps(lesion(0.8, 1.9, 0.9))
    assert not rule.keeps(lesion(0.8, 2.0, 0.89))
    assert not rule.keeps(lesion(0.8, 2.0, None))       # no candidate reaches it: no confirmation
    assert not LesionRule(min_mean_probability=0.85).keeps(lesion(0.8, 2.0, 0.9))   # mean = max here
    assert LesionRule().keeps(lesion(0.5, 0.0, None))   # the default keeps every component of the mask


def two_blob_result(spacing=(0.5, 0.5, 2.0)):
    probability = np.zeros((10, 20, 20), np.float32)
    probability[4:7, 4:7, 4:7] = 0.97               # 27 voxels, bright
    probability[5, 15, 15] = 0.6                    # one faint voxel
    image = make_image(probability, spacing, (3.0, -2.0, 1.0))
    mask = sitk.Cast(image >= 0.5, sitk.sitkUInt8)
    detections = [{"world_mm": list(image.TransformIndexToPhysicalPoint((5, 5, 5))), "screening_score": 0.9,
                   "discrimination_score": 0.99}]
    return SegmentationResult(mask, image, detections)


def test_apply_rule_drops_components_and_keeps_geometry_and_probability():
    result = two_blob_result()
    kept_result, labels, lesions, kept = apply_rule(result, LesionRule(min_probability=0.9))
    assert [lesion.max_probability for lesion in lesions] == [pytest.approx(0.97), pytest.approx(0.6)]
    assert kept == [True, False]
    out = sitk.GetArrayFromImage(kept_result.mask)
    assert out.sum() == 27 and out[5, 15, 15] == 0 and out.dtype == np.uint8
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(kept_result.mask, attribute)() == getattr(result.mask, attribute)()
    assert kept_result.probability is result.probability          # the map is left as the U-Net made it
    assert label_components(labels > 0)[1] == 2                    # the components before the rule
    # volume and discrimination minima: the faint voxel is 0.5 mm^3 and no candidate reaches it
    assert apply_rule(result, LesionRule(min_volume_mm3=1.0))[3] == [True, False]
    assert apply_rule(result, LesionRule(min_discrimination=0.5))[3] == [True, False]
    unchanged = apply_rule(result, LesionRule())
    assert unchanged[0] is result and unchanged[3] == [True, True]


def test_rule_from_manifest(tmp_path):
    assert rule_from_manifest(tmp_path) == LesionRule()               # no manifest: keep everything
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}}))
    assert rule_from_manifest(tmp_path) == LesionRule()
    stored = {"min_probability": 0.9, "min_volume_mm3": 2, "min_discrimination": 0.95, "min_mean_probability": 0.8,
              "command": "x"}
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}, "lesion_rule": stored}))
    assert rule_from_manifest(tmp_path) == LesionRule(0.9, 2.0, 0.95, 0.8)
    del stored["min_mean_probability"]                                # every minimum must be there
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {}, "lesion_rule": stored}))
    with pytest.raises(CaseError, match="min_mean_probability"):
        rule_from_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"lesion_rule": {"min_probability": "high"}}))
    with pytest.raises(CaseError, match="MANIFEST.json.*lesion_rule"):
        rule_from_manifest(tmp_path)


def record(subject, components, lesions, ref_voxels=(10,)):
    """A cached case: binary reference lesions of `ref_voxels` voxels; components claim at 1 mm when they claim."""
    components = [{**c, "value_sum": float(c["voxels"]), "distance": None if c["claim"] is None else 1.0}
                  for c in components]
    evidence = {"version": EVIDENCE_VERSION, "voxel_mm3": 1.0, "ref_weights": [1.0] * len(ref_voxels),
                "ref_sums": [float(v) for v in ref_voxels], "ref_total": float(sum(ref_voxels)),
                "pred_total": float(sum(c["voxels"] for c in components)), "components": components}
    return {"subject": subject, "grid": "rss", "evidence": evidence, "lesion_objects": lesions}


def test_choose_rule_takes_the_best_f1_and_breaks_ties_by_the_lowest_minima():
    # case a: a true CMB and a faint 1 mm^3 mimic; case b: a true CMB and a confident 0.4 mm^3 speck
    a = record("sub-a", [{"voxels": 10, "claim": 0, "overlap": 8}, {"voxels": 1, "claim": None, "overlap": 0}],
               [lesion(1.0, 10.0, 0.99), lesion(0.7, 1.0, 0.9)])
    b = record("sub-b", [{"voxels": 5, "claim": 0, "overlap": 5}, {"voxels": 1, "claim": None, "overlap": 0}],
               [lesion(0.96, 5.0, 0.97), lesion(0.99, 0.4, 0.99)])
    # F1 1 needs both mimics gone: the lowest minima that do it, compared in the order probability, volume,
    # discrimination, mean probability (the speck needs a volume minimum, a's mimic a mean or discrimination one)
    assert tune.choose_rule([a, b], min_sensitivity=0.9) == LesionRule(0.5, 0.5, 0.0, 0.8)
    figures = pooled([tune.score_with(r, LesionRule(0.5, 0.5, 0.0, 0.8)) for r in (a, b)])
    assert (figures["f1"], figures["sensitivity"], figures["fp_per_scan"]) == (1.0, 1.0, 0.0)
    assert tune.choose_rule([a], min_sensitivity=0.9) == LesionRule(0.5, 0.0, 0.0, 0.8)
    # a sensitivity floor no rule can keep: still the best F1
    assert tune.choose_rule([a, b], min_sensitivity=1.1) == LesionRule(0.5, 0.5, 0.0, 0.8)


def test_cross_fitting_never_scores_a_case_with_a_rule_chosen_on_it(monkeypatch):
    seen = []
    monkeypatch.setattr(tune, "choose_rule", lambda records, m: seen.append([r["subject"] for r in records])
                        or LesionRule())
    records = [record(f"sub-{i}", [], []) for i in range(5)]
    scores, folds = tune.cross_fit(records, 3, 0.9)
    assert [s.subject for s in scores] == [r["subject"] for r in records]
    for fold, chosen_on in zip(folds, seen):
        assert not set(fold["scored"]) & set(chosen_on)
    assert sorted(s for fold in folds for s in fold["scored"]) == sorted(r["subject"] for r in records)


def test_stagewise_cache_then_tune_records_a_rule_the_pipeline_applies(tmp_path, capsys):
    weights, data, cache = tmp_path / "weights", tmp_path / "data", tmp_path / "cache"
    save_fixed_weights(weights)
    data.mkdir()
    for i, blob in enumerate(((9, 20, 14), (10, 12, 8), None), 1):
        scan = dark_blob_scan(blob=blob, seed=i)
        label = np.zeros(sitk.GetArrayFromImage(scan).shape, np.uint8)
        if blob:
            label[blob] = 1
        sitk.WriteImage(scan, str(data / f"sub-00{i}_space-T2S_desc-masked_T2S.nii.gz"))
        sitk.WriteImage(make_image(label, scan.GetSpacing(), scan.GetOrigin()),
                        str(data / f"sub-00{i}_space-T2S_CMB.nii.gz"))
    args = ["--data", str(data), "--weights", str(weights), "--device", "cpu", "--cache", str(cache)]
    assert stagewise.main(args) == 0
    assert sorted(p.name for p in cache.iterdir()) == ["sub-001.json", "sub-002.json", "sub-003.json"]
    record = json.loads((cache / "sub-001.json").read_text())  # what the weights comparison reports per scan
    assert record["candidates"] >= record["confirmed"] >= 1
    first = capsys.readouterr().out
    assert "after lesion rule" in first
    assert stagewise.main(args) == 0                         # a rerun reads every case from the cache
    assert capsys.readouterr().out == first

    assert tune.main(["--cache", str(cache), "--weights", str(weights), "--folds", "3", "--record"]) == 0
    # the command recorded is the one main() was given (was: the test runner's own sys.argv)
    tune_command = f"valdocmb-tune --cache {cache} --weights {weights} --folds 3 --record"
    assert json.loads((weights / MANIFEST).read_text())["lesion_rule"]["command"] == tune_command
    assert stagewise.main([*args, "--record"]) == 0
    validation = json.loads((weights / MANIFEST).read_text())["validation"]
    assert validation["command"] == "valdocmb-stagewise " + " ".join([*args, "--record"])
    assert "lesion_rule" in json.loads((weights / MANIFEST).read_text())  # one update never drops another's entry
    # records of other weights: tune refuses to record, and stagewise runs such a case again
    stale = json.loads((cache / "sub-002.json").read_text())
    (cache / "sub-002.json").write_text(json.dumps({**stale, "weights": "0123456789ab"}))
    assert tune.main(["--cache", str(cache), "--weights", str(weights), "--record"]) == 2
    assert stagewise.main(args) == 0
    assert json.loads((cache / "sub-002.json").read_text())["weights"] == stale["weights"]
    # a record made under another candidate cap (a budget recorded since) is run again too
    capped = json.loads((cache / "sub-003.json").read_text())
    assert capped["max_candidates"] == 2000
    (cache / "sub-003.json").write_text(json.dumps({**capped, "max_candidates": 500, "candidates": -1}))
    assert stagewise.main(args) == 0
    assert json.loads((cache / "sub-003.json").read_text())["candidates"] == capped["candidates"]
    stored = json.loads((weights / MANIFEST).read_text())["lesion_rule"]
    assert {"min_probability", "min_volume_mm3", "min_discrimination", "cross_fitted", "folds"} <= set(stored)
    pipeline = ThreeStagePipeline.from_weights(weights, "cpu")
    assert pipeline.config.lesion_rule == rule_from_manifest(weights)
    # a rule no component passes leaves an empty mask, while the components before it are still known
    manifest = json.loads((weights / MANIFEST).read_text())
    manifest["lesion_rule"].update(min_probability=1.01)
    (weights / MANIFEST).write_text(json.dumps(manifest))
    pipeline = ThreeStagePipeline.from_weights(weights, "cpu")
    result, detection = pipeline.segment_with_detection(dark_blob_scan(), {})
    assert sitk.GetArrayFromImage(result.mask).sum() == 0
    assert detection.kept == [False] and result.info["components"] == 1

    # process.py applies it by default; --lesion-rule off keeps every component
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(dark_blob_scan(), str(inp / "sub-201_space-T2S_desc-masked_T2S.nii.gz"))
    for choice, voxels in (("weights", 0), ("off", 1)):
        out = tmp_path / f"out-{choice}"
        code = run.main(["--input", str(inp), "--output", str(out), "--weights", str(weights), "--device", "cpu",
                         "--lesion-rule", choice])
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "sub-201_space-T2S_prediction.nii.gz")))
        assert code == 0 and int(mask[9, 20, 14]) == voxels


def test_reference_ranks_and_the_candidate_budget_they_give():
    from valdocmb.core.three_stage import Candidate

    reference = np.zeros((12, 30, 30), np.uint8)              # z, y, x; 1 mm voxels, origin 0
    reference[5, 10, 10] = reference[5, 10, 11] = 1            # centre (x 10.5, y 10, z 5) mm
    reference[8, 25, 25] = 1                                   # no candidate near it
    image = sitk.GetImageFromArray(reference)

    class Identity:   # the cropped processing grid is the reference grid
        @staticmethod
        def voxel_to_world(zyx):
            return np.asarray(zyx, float)[..., ::-1]

    candidates = [Candidate((5, 20, 20), 0.9), Candidate((6, 11, 12), 0.8), Candidate((5, 10, 10), 0.7)]
    ranks = stagewise.reference_ranks(image, Identity, candidates)
    # the first candidate within 3 mm of the first microbleed is the second one (1.0, 1.0, 1.5 mm away)
    assert ranks == [{"rank": 2, "screening_score": 0.8}, {"rank": None, "screening_score": None}]
    records = [{"candidates": 3, "reference_ranks": ranks}, {"candidates": 1, "reference_ranks": [{"rank": 1}]}]
    rows = {row["budget"]: row for row in stagewise.candidate_budget(records, budgets=(1, 2))}
    assert (rows[1]["held"], rows[1]["microbleeds"], rows[1]["candidates_per_scan"], rows[1]["scans_capped"]) \
        == (1, 3, 1.0, 1)
    assert (rows[2]["held"], rows[2]["candidates_per_scan"], rows[2]["scans_capped"]) == (2, 1.5, 1)
