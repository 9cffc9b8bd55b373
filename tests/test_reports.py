"""Lesion tables, labelled masks, QC pictures, run.json: what a researcher gets back."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from valdocmb.core import run
from valdocmb.core.report import lesion_table
from valdocmb.core.result import SegmentationResult

from conftest import DarkSpotSegmenter, brain_like, make_image, rotation


def result_with_two_lesions(direction=None, origin=(10.0, -20.0, 5.0)):
    shape = (12, 30, 28)
    mask = np.zeros(shape, np.uint8)
    mask[3:5, 5:8, 5:8] = 1          # 18 voxels
    mask[8, 20, 20] = 1              # 1 voxel
    probability = mask * 0.7
    probability[8, 20, 20] = 0.95
    spacing = (0.5, 0.6, 2.0)
    mask_image = make_image(mask, spacing, origin, direction)
    prob_image = make_image(probability.astype(np.float32), spacing, origin, direction)
    world_small = mask_image.TransformIndexToPhysicalPoint((20, 20, 8))
    detections = [{"world_mm": list(world_small), "screening_score": 0.8, "discrimination_score": 0.9}]
    return SegmentationResult(mask_image, prob_image, detections, {}), mask


@pytest.mark.parametrize("direction", [None, rotation(0, 0, 90), np.diag([-1.0, -1.0, 1.0])])
def test_table_rows_match_the_labelled_components_and_world_coordinates(direction):
    result, mask = result_with_two_lesions(direction)
    labels, lesions = lesion_table(result)
    assert len(lesions) == 2 and labels.max() == 2
    # numbered by decreasing maximum probability: the single voxel (p 0.95) is lesion 1
    assert (labels == 1).sum() == 1 and (labels == 2).sum() == 18
    assert np.array_equal(labels > 0, mask > 0)
    first, second = lesions
    assert (first.voxel_x, first.voxel_y, first.voxel_z) == (20, 20, 8)
    expected_world = result.mask.TransformIndexToPhysicalPoint((20, 20, 8))
    assert (first.world_x_mm, first.world_y_mm, first.world_z_mm) == pytest.approx(expected_world, abs=0.01)
    assert first.volume_mm3 == pytest.approx(0.5 * 0.6 * 2.0) and second.volume_voxels == 18
    assert first.max_probability == pytest.approx(0.95) and second.mean_probability == pytest.approx(0.7)
    assert (first.screening_score, first.discrimination_score) == (0.8, 0.9)
    assert second.screening_score is None
    centre = ndimage.center_of_mass(labels == 2)
    assert (second.voxel_z, second.voxel_y, second.voxel_x) == pytest.approx(centre, abs=0.01)


def test_a_lesion_takes_the_scores_of_the_candidate_whose_patch_reaches_it():
    result, _ = result_with_two_lesions()
    # the 18-voxel lesion (mask[3:5, 5:8, 5:8]) has its centre at index (x, y, z) = (6, 6, 3.5)
    centre = np.array(result.mask.TransformContinuousIndexToPhysicalPoint((6.0, 6.0, 3.5)))
    near = {"world_mm": list(centre + [0, 0, 6.0]), "screening_score": 0.5, "discrimination_score": 0.6,
            "reach_mm": 7.0}                                   # 6 mm away, reaches 7 mm: its patch covers the lesion
    nearer_but_short = {"world_mm": list(centre + [0, 4.0, 0]), "screening_score": 0.1, "discrimination_score": 0.2,
                        "reach_mm": 3.0}                       # 4 mm away, reaches only 3 mm
    result.detections += [near, nearer_but_short]
    _, lesions = lesion_table(result)
    assert (lesions[0].screening_score, lesions[0].discrimination_score) == (0.8, 0.9)   # the one inside wins
    assert (lesions[1].screening_score, lesions[1].discrimination_score) == (0.5, 0.6)
    near["reach_mm"] = 5.0                                     # now nothing reaches the lesion
    assert lesion_table(result)[1][1].screening_score is None


def test_folder_run_writes_tables_labels_qc_summary_and_run_json(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    spots = ((8, 12, 10), (8, 28, 26))
    sitk.WriteImage(make_image(brain_like((17, 40, 36), dark_spots=spots), (0.49, 0.49, 0.8)), str(inp / "a.nii.gz"))
    sitk.WriteImage(make_image(brain_like((17, 40, 36), dark_spots=()), (0.49, 0.49, 0.8)), str(inp / "b.nii.gz"))
    method = DarkSpotSegmenter(z_threshold=-6.0)  # the spots lie near z = -9; noise never reaches -6
    assert run.main(["--input", str(inp), "--output", str(out), "--probability"], method=method) == 0

    rows = list(csv.DictReader(open(out / "a_CMB_lesions.csv")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a_CMB_labels.nii.gz")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a_CMB.nii.gz")))
    assert len(rows) == 2 and labels.max() == 2 and np.array_equal(labels > 0, mask > 0)
    for row in rows:
        assert int(row["volume_voxels"]) == (labels == int(row["id"])).sum()
    assert json.loads((out / "a_CMB_lesions.json").read_text())["cmb_count"] == 2
    assert sitk.ReadImage(str(out / "a_CMB_probability.nii.gz")).GetPixelID() == sitk.sitkFloat32

    for name in ("a", "b"):
        picture = out / "qc" / f"{name}.png"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 2000
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["case"], r["status"], r["cmb_count"]) for r in summary] == [("a", "ok", "2"), ("b", "ok", "0")]
    page = (out / "index.html").read_text()
    assert 'src="qc/a.png"' in page and 'src="qc/b.png"' in page

    record = json.loads((out / "run.json").read_text())
    assert record["valdocmb"] and record["torch"] and record["simpleitk"]
    assert record["parameters"]["method"] == "three-stage" and record["parameters"]["input"] == str(inp)
    assert [c["case"] for c in record["cases"]] == ["a", "b"]
    assert "segment" in record["cases"][0]["timings"]
    assert record["method"]["method"] == "dark-spot stand-in"


def test_reports_off_writes_only_masks(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    sitk.WriteImage(make_image(brain_like(), (0.49, 0.49, 0.8)), str(inp / "a.nii.gz"))
    assert run.main(["--input", str(inp), "--output", str(out), "--reports", "off"], method=DarkSpotSegmenter()) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_CMB.nii.gz", "run.json"]


def test_lesion_table_in_the_mask_box_equals_scipy_over_the_whole_volume():
    """The table measures components in the box around the mask: the same figures as scipy's whole-volume ones."""
    rng = np.random.default_rng(7)
    mask = np.zeros((30, 40, 50), np.uint8)
    for z, y, x in [(5, 8, 40), (20, 30, 12), (21, 31, 14), (12, 20, 25)]:
        mask[z:z + rng.integers(1, 4), y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = 1
    probability = (rng.random(mask.shape) * mask).astype(np.float32)
    image = sitk.GetImageFromArray(mask)
    image.SetSpacing((0.5, 0.7, 2.0))
    prob_image = sitk.GetImageFromArray(probability)
    prob_image.CopyInformation(image)
    labels, lesions = lesion_table(SegmentationResult(image, prob_image, []))

    expected, n = ndimage.label(mask, np.ones((3, 3, 3)))
    assert len(lesions) == n and labels.shape == mask.shape and labels.dtype == np.uint16
    assert set(np.unique(labels[mask > 0])) == set(range(1, n + 1)) and not labels[mask == 0].any()
    for lesion in lesions:
        component = expected == expected[labels == lesion.id][0]
        assert np.array_equal(component, labels == lesion.id)
        assert lesion.volume_voxels == component.sum()
        assert lesion.max_probability == round(float(probability[component].max()), 4)
        assert lesion.mean_probability == round(float(probability[component].mean()), 4)
        centre = ndimage.center_of_mass(component)
        assert (lesion.voxel_z, lesion.voxel_y, lesion.voxel_x) == tuple(round(c, 2) for c in centre)
