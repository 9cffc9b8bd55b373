import math

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.evaluate import folders
from valdocmb.evaluate.__main__ import main as evaluate_main
from valdocmb.evaluate.folders import subject_id
from valdocmb.evaluate.scoring import (
    component_evidence,
    label_components,
    missing_score,
    score_case,
    score_components,
    summarize,
)

from conftest import make_image, rotation

SHAPE = (20, 30, 30)


def cube(array, centre, half=1, value=1.0):
    z, y, x = centre
    array[z - half:z + half + 1, y - half:y + half + 1, x - half:x + half + 1] = value
    return array


def empty():
    return np.zeros(SHAPE, np.float32)


def score(ref, pred, spacing=(1.0, 1.0, 1.0), **kw):
    return score_case(make_image(ref, spacing), make_image(pred, spacing), "sub-001", **kw)


def test_perfect_prediction():
    ref = cube(cube(empty(), (5, 5, 5)), (14, 20, 20))
    s = score(ref, ref.copy())
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)
    assert s.f1 == 1.0 and s.dice == 1.0 and s.count_diff == 0 and s.volume_diff == 0


def test_two_predictions_claiming_one_reference():
    # Reference: one 3x3x3 cube (27 voxels). Predictions: a voxel inside it and one 2 voxels out, both claim it:
    # the nearer claim is the TP, the other an FP.
    ref = cube(empty(), (10, 10, 10))
    pred = empty()
    pred[10, 10, 10] = 1
    pred[10, 10, 12] = 1
    s = score(ref, pred)
    assert (s.n_ref, s.n_pred, s.tp, s.fp, s.fn, s.found) == (1, 2, 1, 1, 0, 1)
    assert s.f1 == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))
    # Dice of the reference against the union of both claims: 2*1 / (27 + 2)
    assert s.dice == pytest.approx(2 / 29)
    assert s.count_diff == 1
    assert s.volume_diff == pytest.approx(25.0)


# The three cases below were worked by hand and run through the official code (WhereIsValdo/valdo-eval-2021,
# PairwiseMeasures with analysis="microbleeds", connectivity 3, thresh_assign 5, the voxel sizes as float32): the
# values asserted are the official code's. The scorer before this change gave the values in the comments.

def test_official_an_exact_tie_between_two_claims_gives_two_true_positives():
    # two single voxels at exactly 1 mm on either side of a 3x3x3 reference's centre
    ref = cube(empty(), (10, 10, 10))
    pred = empty()
    pred[10, 10, 9] = 1
    pred[10, 10, 11] = 1
    s = score(ref, pred)
    # official: TP 2, FP 0, F1 1.0, Dice 4/29 = 0.13793103448275862, count diff 1, volume diff 25.0
    # (before: TP 1, FP 1, F1 0.6667)
    assert (s.tp, s.fp, s.fn, s.found) == (2, 0, 0, 1)
    assert s.f1 == 1.0 and s.dice == 0.13793103448275862 and s.count_diff == 1.0 and s.volume_diff == 25.0


def test_official_a_prediction_equally_near_two_references_claims_the_first_in_x_then_y_then_z_order():
    # references at (z, y, x) = (5, 10, 14) and (9, 10, 6): first in (z, y, x) order is the former, in the
    # official (x, y, z) order the latter. A prediction on the first and one at sqrt(20) mm from both.
    ref = empty()
    ref[5, 10, 14] = ref[9, 10, 6] = 1
    pred = empty()
    pred[5, 10, 14] = pred[7, 10, 10] = 1
    s = score(ref, pred)
    # official: the middle prediction claims (9, 10, 6): TP 2, FP 0, F1 1.0, Dice 0.5 (1 and 0), count diff 0
    # (before: it claimed (5, 10, 14) too: TP 1, FP 1, FN 1, F1 0.5)
    assert (s.tp, s.fp, s.fn, s.found) == (2, 0, 0, 2)
    assert s.f1 == 1.0 and s.dice == 0.5 and s.count_diff == 0.0 and s.volume_diff == 0.0


@pytest.mark.parametrize("direction", [None, rotation(0, 0, 30), rotation(10, 20, 30)])
def test_official_centroids_exactly_5_mm_apart_on_a_1x1x3_grid_do_not_match(tmp_path, direction):
    # offset (x, y, z) = (4, 0, 1) voxels at 1 x 1 x 3 mm: sqrt(16 + 9) = 5.0 mm, not closer than 5 mm
    ref, pred = empty(), empty()
    ref[10, 10, 10] = 1
    pred[11, 10, 14] = 1
    sitk.WriteImage(make_image(ref, (1, 1, 3), direction=direction), str(tmp_path / "ref.nii.gz"))
    sitk.WriteImage(make_image(pred, (1, 1, 3), direction=direction), str(tmp_path / "pred.nii.gz"))
    s = score_case(sitk.ReadImage(str(tmp_path / "ref.nii.gz")), sitk.ReadImage(str(tmp_path / "pred.nii.gz")))
    # official: TP 0, FP 1, FN 1, F1 0.0, Dice 0.0 (before, on the oblique grids: a TP, from 4.999999... mm)
    assert (s.tp, s.fp, s.fn) == (0, 1, 1) and s.f1 == 0.0 and s.dice == 0.0


def test_official_volume_uses_the_float32_voxel_size_and_the_clipped_values():
    ref = cube(empty(), (10, 10, 10), half=0)
    pred = empty()
    pred[10, 10, 10] = 0.9
    pred[10, 10, 11] = 0.75
    s = score(ref, pred, spacing=(0.449, 0.449, 4.0))
    voxel = float(np.float32(0.449) * np.float32(0.449) * np.float32(4.0))
    assert s.volume_diff == abs(float(np.float32(0.9) + np.float32(0.75)) - 1.0) * voxel


def test_non_binary_reference_weighs_each_lesion_by_its_highest_value():
    # the official F1 weighs a TP or FN by its reference lesion's highest value (raters' agreement, 0.5 / 1)
    ref = empty()
    cube(ref, (5, 5, 5), value=0.5)
    cube(ref, (14, 20, 20), value=1.0)
    pred = cube(empty(), (5, 5, 5))
    s = score(ref, pred)
    assert (s.tp, s.fn) == (1, 1)
    assert s.f1 == 2 * 0.5 / (2 * 0.5 + 0 + 1.0)
    assert s.dice == 2 * 27 * 0.5 / (27 + 27 * 0.5)


def test_prediction_claims_the_nearest_reference():
    ref = cube(cube(empty(), (10, 10, 5)), (10, 10, 12))
    pred = empty()
    pred[10, 10, 11] = 1      # 6 voxels from the first centre, 1 from the second (and inside it)
    s = score(ref, pred, distance_mm=10)
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert s.dice == pytest.approx(2 * 1 / (27 + 1))


@pytest.mark.parametrize("threshold,matched", [(4.99, False), (5.0, False), (5.01, True)])
def test_distance_just_under_and_over_the_threshold(threshold, matched):
    ref = cube(empty(), (10, 10, 10))
    pred = cube(empty(), (10, 10, 15), half=0)   # centroids exactly 5 mm apart along x
    s = score(ref, pred, distance_mm=threshold)
    assert (s.tp, s.fp, s.fn) == ((1, 0, 0) if matched else (0, 1, 1))
    assert s.f1 == (1.0 if matched else 0.0)


def test_distance_is_in_millimetres_with_anisotropic_voxels():
    ref = cube(empty(), (10, 10, 10))
    pred = cube(empty(), (12, 10, 10), half=0)   # 2 slices away: 6 mm at 3 mm slices
    assert score(ref, pred, spacing=(0.5, 0.5, 3.0), distance_mm=5).tp == 0
    assert score(ref, pred, spacing=(0.5, 0.5, 2.0), distance_mm=5).tp == 1


def test_distance_ignores_the_direction_matrix_as_the_official_code_does():
    ref = cube(empty(), (10, 10, 10))
    pred = cube(empty(), (10, 10, 14), half=0)   # 4 voxels along x
    direction = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)  # x axis along world z
    ref_img = make_image(ref, (2.0, 1.0, 1.0), direction=direction)
    pred_img = make_image(pred, (2.0, 1.0, 1.0), direction=direction)
    assert score_case(ref_img, pred_img, distance_mm=7.9).tp == 0   # 4 voxels x 2 mm = 8 mm
    assert score_case(ref_img, pred_img, distance_mm=8.1).tp == 1


def test_empty_reference_and_empty_prediction():
    s = score(empty(), empty())
    assert math.isnan(s.f1) and math.isnan(s.dice)
    assert s.count_diff == 0 and s.volume_diff == 0 and (s.tp, s.fp, s.fn) == (0, 0, 0)


def test_empty_reference_with_false_positives():
    s = score(empty(), cube(empty(), (5, 5, 5)))
    assert math.isnan(s.f1) and math.isnan(s.dice)
    assert (s.fp, s.count_diff, s.volume_diff) == (1, 1, 27)


def test_empty_prediction_with_reference():
    s = score(cube(empty(), (5, 5, 5)), empty())
    assert s.f1 == 0 and s.dice == 0 and s.fn == 1 and s.count_diff == 1


def test_probability_map_threshold_and_volume():
    ref = cube(empty(), (10, 10, 10), half=0)        # 1 voxel of 2 mm^3
    pred = empty()
    pred[10, 10, 10] = 0.9
    pred[10, 10, 11] = 0.6
    pred[10, 10, 12] = 0.4                           # below 0.5: neither detected nor counted in volume
    s = score(ref, pred, spacing=(1.0, 1.0, 2.0))
    assert (s.n_pred, s.tp, s.fp) == (1, 1, 0)
    assert s.volume_diff == pytest.approx(abs(0.9 + 0.6 - 1.0) * 2.0)
    assert s.dice == pytest.approx(2 * 1 / (1 + 2))


@pytest.mark.parametrize("connectivity,components", [(26, 1), (18, 2), (6, 2)])
def test_connectivity(connectivity, components):
    pred = empty()
    pred[5, 5, 5] = pred[6, 6, 6] = 1     # corner neighbours
    s = score(empty(), pred, connectivity=connectivity)
    assert s.n_pred == components


def test_size_mismatch_is_an_error():
    with pytest.raises(Exception, match="size"):
        score_case(make_image(empty()), make_image(np.zeros((5, 5, 5), np.float32)), "sub-9")


def test_summary_median_iqr_pooled_and_worst_values_for_missing():
    a = score(cube(empty(), (5, 5, 5)), cube(empty(), (5, 5, 5)))                     # F1 1
    b = score(cube(cube(empty(), (5, 5, 5)), (15, 20, 20)), cube(empty(), (5, 5, 5)))   # F1 2/3
    c = score(empty(), cube(empty(), (5, 5, 5)))                                      # F1 NaN, 1 FP
    d = missing_score("sub-004", n_ref=3)                                             # F1 0
    summary = summarize([a, b, c, d])
    assert summary["f1"]["n"] == 3
    assert summary["f1"]["median"] == pytest.approx(2 / 3)
    assert summary["f1"]["q1"] == pytest.approx(np.percentile([1, 2 / 3, 0], 25))
    assert summary["count_diff"]["median"] == pytest.approx(1.0)    # values 0, 1, 1, 100000
    assert d.volume_diff == 100000 and d.dice == 0
    pooled = summary["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (2, 1, 4)
    assert pooled["sensitivity"] == pytest.approx(2 / 6)
    assert pooled["precision"] == pytest.approx(2 / 3)
    assert pooled["fp_per_scan"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("name,expected", [
    ("sub-101_space-T2S_CMB.nii.gz", "sub-101"),
    ("sub-101_space-T2S_prediction.nii.gz", "sub-101"),
    ("patient7_CMB.mha", "patient7"),
    ("patient7.nii", "patient7"),
])
def test_subject_id(name, expected):
    assert subject_id(name) == expected


def test_cli_pairs_by_subject_and_scores_missing_as_worst(tmp_path, capsys):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred" / "images"
    ref_dir.mkdir()
    pred_dir.mkdir(parents=True)
    lesion = cube(empty(), (8, 8, 8))
    for sid in ("sub-101", "sub-102"):
        sitk.WriteImage(make_image(lesion), str(ref_dir / f"{sid}_space-T2S_CMB.nii.gz"))
        # a scan beside the labels (a VALDO training folder) must be ignored
        sitk.WriteImage(make_image(lesion * 50), str(ref_dir / f"{sid}_space-T2S_desc-masked_T2S.nii.gz"))
    sitk.WriteImage(make_image(lesion), str(pred_dir / "sub-101_space-T2S_prediction.nii.gz"))
    csv_path = tmp_path / "scores.csv"

    code = evaluate_main(["--reference", str(ref_dir), "--prediction", str(tmp_path / "pred"),
                          "--csv", str(csv_path)])
    out = capsys.readouterr().out
    assert code == 1                       # a prediction is missing
    assert "sub-101" in out and "sub-102" in out and "missing" in out
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("sub-101,ok,1.0")
    assert "100000.0" in rows[2]


def test_report_side_outputs_beside_a_mask_are_not_taken_for_masks(tmp_path):
    # `process.py --reports on --probability` writes these next to each mask; a lone _labels file is still a mask
    lesion = cube(empty(), (8, 8, 8))
    for name in ("sub-101_space-T2S_prediction.nii.gz", "sub-101_space-T2S_prediction_labels.nii.gz",
                 "sub-101_space-T2S_prediction_probability.nii.gz", "b_labels.nii.gz"):
        sitk.WriteImage(make_image(lesion), str(tmp_path / name))
    found = folders.collect(tmp_path)
    assert {k: p.name for k, p in found.items()} == {"sub-101": "sub-101_space-T2S_prediction.nii.gz",
                                                     "b_labels": "b_labels.nii.gz"}


def test_component_evidence_scores_every_subset_as_score_case_does():
    """Scoring kept components from the evidence equals scoring the filtered mask, for every subset."""
    import itertools

    spacing = (0.6, 0.8, 1.5)
    ref = cube(cube(cube(empty(), (5, 5, 5)), (14, 20, 20)), (10, 10, 22))
    pred = empty()
    pred[5, 4:7, 4:7] = 1.0                      # on reference A
    pred[5:7, 8, 5] = 1.0                        # a second, nearer-than-5-mm claim on A
    cube(pred, (14, 21, 21))                     # on B, shifted by one voxel
    cube(pred, (3, 25, 3), half=0)               # far from everything
    pred[11, 10, 25] = 1.0                       # within 5 mm of C, no overlap
    reference, prediction = make_image(ref, spacing), make_image(pred, spacing)
    pred[11, 9, 22] = pred[11, 11, 22] = 1.0     # two claims on C at exactly the same distance: two TPs
    reference, prediction = make_image(ref, spacing), make_image(pred, spacing)
    labels, n = label_components(pred >= 0.5)    # (z, y, x) order, as a lesion table numbers them
    assert n == 7
    evidence = component_evidence(reference, prediction, labels.transpose(2, 1, 0), n)
    for keep in itertools.product((False, True), repeat=n):
        filtered = np.isin(labels, [i + 1 for i in range(n) if keep[i]]).astype(np.float32)
        expected = score_case(reference, make_image(filtered, spacing), "sub-001")
        got = score_components(evidence, keep, "sub-001")
        assert got == expected, keep             # bit for bit, every field


def test_evidence_measured_in_the_occupied_box_equals_the_whole_grid_bit_for_bit():
    """Components are labelled and measured in the box that holds them: the same labels, centres and sums as
    scipy gives on the whole grid (the official code's way), to the last bit."""
    from scipy import ndimage

    from valdocmb.evaluate.scoring import centres_index, occupied_box

    rng = np.random.default_rng(4)
    shape = (40, 50, 60)
    ref = np.zeros(shape, np.float32)
    pred = np.zeros(shape, np.float32)
    for _ in range(25):
        z, y, x = (int(rng.integers(0, n - 3)) for n in shape)
        ref[z:z + rng.integers(1, 4), y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = rng.choice([0.5, 1.0])
        z, y, x = z + int(rng.integers(-2, 3)), y + int(rng.integers(-2, 3)), x + int(rng.integers(-2, 3))
        pred[max(z, 0):z + 3, max(y, 0):y + 2, max(x, 0):x + 3] = rng.uniform(0.4, 1.0)
    pred[:, :, :5] = 0                             # nothing near one face: the box is smaller than the grid
    labels, n = label_components(pred.transpose(2, 1, 0) >= 0.5)
    box = occupied_box(labels > 0)
    assert n > 10 and box[0].start >= 5           # (x, y, z) order: x < 5 is empty
    whole = np.array(ndimage.center_of_mass(np.ones(labels.shape, np.uint8), labels, range(1, n + 1)))
    boxed = centres_index(labels[box], n, [b.start for b in box])
    assert np.array_equal(whole, boxed)            # bit for bit

    spacing = (0.45, 0.45, 4.0)
    evidence = component_evidence(make_image(ref, spacing), make_image(pred, spacing))
    # the whole-grid computation, as scoring did it before the box
    ref_xyz = np.around(ref.transpose(2, 1, 0), 1)
    ref_labels, n_ref = label_components(ref_xyz != 0)
    assert len(evidence["ref_weights"]) == n_ref and len(evidence["components"]) == n
    assert evidence["ref_sums"] == [float(v) for v in ndimage.sum(ref_xyz, ref_labels, range(1, n_ref + 1))]
    native = np.ascontiguousarray(pred.transpose(2, 1, 0))
    for p, component in enumerate(evidence["components"]):
        inside = labels == p + 1
        assert component["voxels"] == int(inside.sum())
        assert component["value_sum"] == float(native[inside].sum(dtype=np.float64))
    assert evidence["ref_total"] == float(np.sum(ref_xyz))
    ref_centres = np.array(ndimage.center_of_mass(np.ones(shape[::-1], np.uint8), ref_labels, range(1, n_ref + 1)))
    claimed = [c for c in evidence["components"] if c["claim"] is not None]
    assert claimed
    for p, component in enumerate(evidence["components"]):
        if component["claim"] is not None:
            expected = np.linalg.norm((whole[p] - ref_centres[component["claim"]]) * np.array(spacing, np.float32))
            assert component["distance"] == pytest.approx(expected, rel=1e-12)
