"""nnU-Net v2 baseline: conversion, a tiny real training run baked into a model folder, and `--method nnunet` on
every layout (geometry, orientation, output contract), plus the ensemble's combination rule."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_layouts_and_run import gc_input

from valdocmb.core import run
from valdocmb.core.ensemble import EnsembleMethod
from valdocmb.core.errors import CaseError
from valdocmb.core.imageio import same_geometry
from valdocmb.core.nnunet import NnUNetMethod, nnunet_environment
from valdocmb.core.result import SegmentationResult
from valdocmb.core.weights import sha256
from valdocmb.train.nnunet import convert_dataset

from conftest import brain_like, make_image, rotation

pytestmark = pytest.mark.slow  # minutes of training, simulation or a soak: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parent.parent
SPACING = (0.49, 0.49, 0.8)


def write_case(folder, subject, seed, spots, direction=None, nan=False):
    array = brain_like((24, 40, 40), seed=seed, dark_spots=spots)
    label = np.zeros(array.shape, np.uint8)
    for z, y, x in spots:
        label[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = 1
    if nan:
        array[0, 0, 0] = np.nan
    sitk.WriteImage(make_image(array, SPACING, (1.0, -2.0, 3.0), direction),
                    str(folder / f"{subject}_space-T2S_desc-masked_T2S.nii.gz"))
    sitk.WriteImage(make_image(label, SPACING, (1.0, -2.0, 3.0), direction),
                    str(folder / f"{subject}_space-T2S_CMB.nii.gz"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nnunet-data")
    write_case(folder, "sub-001", 1, [(12, 20, 20)])
    write_case(folder, "sub-002", 2, [(8, 12, 12), (16, 28, 26)], direction=np.diag([-1.0, -1.0, 1.0]), nan=True)
    write_case(folder, "sub-003", 3, [])
    write_case(folder, "sub-004", 4, [(10, 25, 15)])
    return folder


def train_command(data, work, out):
    return [sys.executable, "-m", "valdocmb.nnunet_train", "--data", str(data), "--work", str(work), "--out",
            str(out), "--epochs", "2", "--iterations", "2", "--val-iterations", "1", "--device", "cpu",
            "--workers", "1"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A real nnU-Net training run (2 epochs x 2 iterations) baked into a weights folder."""
    base = tmp_path_factory.mktemp("nnunet-run")
    work, weights = base / "work", base / "weights"
    done = subprocess.run(train_command(data, work, weights), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"work": work, "weights": weights, "stdout": done.stdout, "stderr": done.stderr}


def test_conversion_writes_lps_nan_free_images_and_binary_labels(data, tmp_path):
    folder = convert_dataset(data, tmp_path, 502, "T")
    assert folder.name == "Dataset502_T"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T2star"} and meta["labels"] == {"background": 0, "CMB": 1}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    image = sitk.ReadImage(str(folder / "imagesTr" / "sub-002_0000.nii.gz"))
    label = sitk.ReadImage(str(folder / "labelsTr" / "sub-002.nii.gz"))
    assert np.allclose(image.GetDirection(), np.eye(3).ravel()) and same_geometry(image, label)
    assert np.isfinite(sitk.GetArrayFromImage(image)).all()
    # the RAS-stored scan was flipped in x and y: its first voxel (the NaN, now 0) is at the far x/y corner
    assert sitk.GetArrayFromImage(image)[0, -1, -1] == 0
    assert set(np.unique(sitk.GetArrayFromImage(label))) == {0, 1} and label.GetPixelID() == sitk.sitkUInt8


def test_conversion_refuses_a_label_on_another_grid(data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_case(bad, "sub-009", 9, [(12, 20, 20)])
    label = sitk.ReadImage(str(bad / "sub-009_space-T2S_CMB.nii.gz"))
    label.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(label, str(bad / "sub-009_space-T2S_CMB.nii.gz"))
    with pytest.raises(CaseError, match="sub-009_space-T2S_CMB.nii.gz: label grid differs"):
        convert_dataset(bad, tmp_path / "raw", 503, "B")


def test_baked_model_folder_is_inference_only_and_in_the_manifest(trained):
    model = trained["weights"] / "nnunet"
    assert (model / "dataset.json").is_file() and (model / "plans.json").is_file()
    checkpoint_path = model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"network_weights", "trainer_name", "inference_allowed_mirroring_axes", "init_args"}
    assert checkpoint["trainer_name"] == "nnUNetTrainer"   # a class nnU-Net's own tools can find by name
    assert all(v.dtype == torch.float16 for v in checkpoint["network_weights"].values() if v.is_floating_point())
    manifest = json.loads((trained["weights"] / "MANIFEST.json").read_text())
    entry = manifest["files"]["nnunet/fold_all/checkpoint_final.pth"]
    assert entry["sha256"] == sha256(checkpoint_path)
    assert entry["training"]["schedule"] == {"epochs": 2, "iterations": 2, "val_iterations": 1}
    assert entry["training"]["trainer"] == "nnUNetTrainerCMB" and entry["training"]["cases"] == 4
    assert trained["stdout"] == ""  # nnU-Net's prints go to the log (stderr)


def nnunet_own_predictor(model_folder: Path):
    """nnU-Net's own way to load a model folder (what nnUNetv2_predict_from_modelfolder does): it finds the
    trainer class by the name in the checkpoint."""
    nnunet_environment()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=("all",),
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


@pytest.mark.parametrize("which", ["baked", "shipped"])
def test_nnunet_own_tools_load_the_model_folder_and_predict_as_we_do(which, request):
    # was: the checkpoint named nnUNetTrainerCMB, a class made inside a function, and nnU-Net could not load it
    weights = request.getfixturevalue("trained")["weights"] if which == "baked" else ROOT / "weights"
    predictor = nnunet_own_predictor(weights / "nnunet")
    ours = NnUNetMethod.from_weights(weights, "cpu")
    scan = sitk.DICOMOrient(make_image(brain_like((24, 40, 40), seed=5), SPACING), "LPS")
    array = sitk.GetArrayFromImage(scan)[None].astype(np.float32)
    properties = {"spacing": list(scan.GetSpacing()[::-1])}
    _, theirs = predictor.predict_single_npy_array(array, properties, None, None, True)
    expected = sitk.GetArrayFromImage(ours.probability(scan, {}))
    np.testing.assert_allclose(theirs[1], expected, atol=1e-6)


def test_training_again_resumes_instead_of_retraining(data, trained):
    done = subprocess.run(train_command(data, trained["work"], trained["weights"]), cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fold all already trained" in done.stderr
    assert "Epoch 0" not in done.stderr


GEOMETRIES = {
    "sub-101": ((0.449, 0.449, 4.0), (1.0, 2.0, 3.0), None),
    "sub-201": ((0.488, 0.488, 0.8), (-90.0, 120.0, -70.0), rotation(0, 8, 0)),
    "sub-301": ((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0])),
}


def scan_for(subject):
    spacing, origin, direction = GEOMETRIES[subject]
    return make_image(brain_like((17, 40, 36), seed=5, dark_spots=((8, 20, 18),)), spacing, origin, direction)


def check_output(mask_path, scan):
    mask = sitk.ReadImage(str(mask_path))
    assert mask.GetPixelID() == sitk.sitkUInt8 and same_geometry(mask, scan)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


def test_method_nnunet_on_the_valdo_layout(trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    scans = {s: scan_for(s) for s in GEOMETRIES}
    for subject, scan in scans.items():
        sitk.WriteImage(scan, str(inputs / f"{subject}_space-T2S_desc-masked_T2S.nii.gz"))
    code = run.main(["--input", str(inputs), "--output", str(tmp_path / "out"), "--method", "nnunet",
                     "--weights", str(trained["weights"]), "--device", "cpu", "--probability"])
    assert code == 0
    for subject, scan in scans.items():
        check_output(tmp_path / "out" / "images" / f"{subject}_space-T2S_prediction.nii.gz", scan)
        probability = sitk.ReadImage(str(tmp_path / "out" / "images" / f"{subject}_space-T2S_prediction_probability"
                                         ".nii.gz"))
        assert same_geometry(probability, scan)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 3 and all(r["error_messages"] == [] for r in results)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["method"]["method"] == "nnunet" and record["method"]["weights"]["folds"] == ["all"]
    assert "nnunet" in record["cases"][0]["timings"]


def test_method_nnunet_on_grand_challenge_sockets_and_a_plain_folder(trained, tmp_path):
    scan = scan_for("sub-201")
    gc_input(tmp_path / "gc", {"t2-star-brain-mri": scan})
    code = run.main(["--input", str(tmp_path / "gc"), "--output", str(tmp_path / "gc-out"), "--method", "nnunet",
                     "--weights", str(trained["weights"]), "--device", "cpu"])
    assert code == 0
    check_output(tmp_path / "gc-out" / "images" / "cerebral-microbleed-segmentation" / "output.mha", scan)
    assert isinstance(json.loads((tmp_path / "gc-out" / "number-of-cerebral-microbleeds.json").read_text()), int)

    folder = tmp_path / "folder"
    folder.mkdir()
    sitk.WriteImage(scan_for("sub-301"), str(folder / "patient7.nii.gz"))
    code = run.main(["--input", str(folder), "--output", str(tmp_path / "folder-out"), "--method", "nnunet",
                     "--weights", str(trained["weights"]), "--device", "cpu"])
    assert code == 0
    check_output(tmp_path / "folder-out" / "patient7_CMB.nii.gz", scan_for("sub-301"))
    assert (tmp_path / "folder-out" / "summary.csv").is_file()


def test_nnunet_sees_the_same_brain_whatever_the_storage_orientation(trained):
    """A scan stored RAS-, PIL- or LPS-wise is the same LPS array to nnU-Net: identical probabilities in space."""
    method = NnUNetMethod.from_weights(trained["weights"], "cpu")
    scan = make_image(brain_like((24, 40, 36), seed=8, dark_spots=((12, 20, 18),)), SPACING, (5.0, 6.0, 7.0))
    reference = sitk.GetArrayFromImage(method.probability(scan, {}))
    for orientation in ("RAS", "PIL", "SRA"):
        stored = sitk.DICOMOrient(scan, orientation)
        probability = method.probability(stored, {})
        assert same_geometry(probability, stored)
        back = sitk.GetArrayFromImage(sitk.DICOMOrient(probability, "LPS"))
        np.testing.assert_allclose(back, reference, atol=1e-6)


def test_broken_model_folders_are_refused_with_the_file_named(trained, tmp_path):
    with pytest.raises(CaseError, match=r"no nnU-Net model folder"):
        NnUNetMethod.from_weights(tmp_path, "cpu")
    copy = tmp_path / "weights"
    subprocess.run(["cp", "-r", str(trained["weights"]), str(copy)], check=True)
    checkpoint = copy / "nnunet" / "fold_all" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CaseError, match=r"checkpoint_final.pth: sha256 differs"):
        NnUNetMethod.from_weights(copy, "cpu")
    (copy / "nnunet" / "plans.json").write_text("{")
    with pytest.raises(CaseError, match=r"plans.json: not valid JSON"):
        NnUNetMethod.from_weights(copy, "cpu")
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(scan_for("sub-101"), str(inputs / "a.nii.gz"))
    assert run.main(["--input", str(inputs), "--output", str(tmp_path / "o"), "--method", "nnunet",
                     "--weights", str(tmp_path / "nothing"), "--device", "cpu"]) == 2


def test_ensemble_keeps_what_the_mean_probability_keeps():
    image = make_image(np.zeros((1, 1, 4), np.float32))

    def result(values, detections=()):
        probability = make_image(np.array([[values]], np.float32))
        mask = sitk.Cast(probability >= 0.5, sitk.sitkUInt8)
        return SegmentationResult(mask, probability, list(detections), {"weights": {"version": "v"}})

    # voxel 0: both sure; 1: one sure, other weakly against (0.55); 2: both lukewarm (0.45); 3: one alone (0.5)
    three = result([0.9, 0.9, 0.6, 1.0], [{"world_mm": [0, 0, 0], "screening_score": 1, "discrimination_score": 1}])
    nnunet = result([0.8, 0.2, 0.3, 0.0])
    combined = EnsembleMethod({}).combine(image, {"three-stage": three, "nnunet": nnunet})
    assert sitk.GetArrayFromImage(combined.mask).ravel().tolist() == [1, 1, 0, 1]
    np.testing.assert_allclose(sitk.GetArrayFromImage(combined.probability).ravel(), [0.85, 0.55, 0.45, 0.5])
    assert combined.detections == three.detections and combined.info["weights"]["version"] == "v+v"
    assert same_geometry(combined.mask, image)


def test_method_ensemble_runs_both_methods_from_one_weights_folder(trained, tmp_path):
    from test_three_stage import save_fixed_weights

    weights = tmp_path / "weights"
    subprocess.run(["cp", "-r", str(trained["weights"]), str(weights)], check=True)
    save_fixed_weights(weights)  # hand-set three-stage weights that find dark spots
    inputs = tmp_path / "in"
    inputs.mkdir()
    scan = scan_for("sub-201")
    sitk.WriteImage(scan, str(inputs / "case.nii.gz"))
    code = run.main(["--input", str(inputs), "--output", str(tmp_path / "out"), "--method", "ensemble",
                     "--weights", str(weights), "--device", "cpu"])
    assert code == 0
    check_output(tmp_path / "out" / "case_CMB.nii.gz", scan)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["method"]["method"] == "ensemble"
    assert set(record["method"]["members"]) == {"three-stage", "nnunet"}
    timings = record["cases"][0]["timings"]
    assert "three-stage.screening" in timings and "nnunet.nnunet" in timings


def test_compare_scores_each_method_and_their_ensemble_on_the_same_cases(data):
    from valdocmb.train.compare import compare, summary_of, table
    from valdocmb.train.samples import find_training_cases

    from conftest import DarkSpotSegmenter

    members = {"three-stage": DarkSpotSegmenter(), "nnunet": DarkSpotSegmenter(z_threshold=-1e9)}  # finds nothing
    rows = compare(find_training_cases(data)[:2], members, EnsembleMethod(members))
    assert [r["method"] for r in rows] == ["three-stage", "nnunet", "ensemble"] * 2
    by = {(r["subject"], r["method"]): r for r in rows}
    assert by["sub-001", "three-stage"]["tp"] == 1 and by["sub-002", "three-stage"]["tp"] == 2
    assert by["sub-001", "nnunet"]["tp"] == 0 and by["sub-001", "nnunet"]["fn"] == 1
    # mean of 1 and 0 is 0.5: kept, so the ensemble equals the method that found them
    assert by["sub-002", "ensemble"]["tp"] == 2
    assert by["sub-002", "ensemble"]["fp"] == by["sub-002", "three-stage"]["fp"]
    summary = summary_of(rows)
    assert summary["ensemble"]["pooled"]["tp"] == 3 and summary["nnunet"]["pooled"]["sensitivity"] == 0
    assert "| ensemble | 2 |" in table(summary)


def test_compare_resumes_from_the_cases_already_scored(data, tmp_path):
    from valdocmb.train.compare import main, read_rows

    out = tmp_path / "compare"
    assert main(["--data", str(data), "--device", "cpu", "--methods", "three-stage", "--max-cases", "1",
                 "--weights", str(ROOT / "weights"), "--out", str(out)]) == 0
    first = read_rows(out / "cases.csv")
    assert [r["subject"] for r in first] == ["sub-001"] and isinstance(first[0]["tp"], int)
    assert main(["--data", str(data), "--device", "cpu", "--methods", "three-stage", "--max-cases", "2",
                 "--weights", str(ROOT / "weights"), "--out", str(out), "--resume"]) == 0
    both = read_rows(out / "cases.csv")
    assert both[0] == first[0] and [r["subject"] for r in both] == ["sub-001", "sub-002"]


def test_finetuning_starts_from_the_given_model_with_its_plans(data, trained, tmp_path):
    """--init: the parent's plans instead of planning, training from its weights, the parent in the manifest."""
    import torch

    out = tmp_path / "mine"
    parent_checkpoint = trained["weights"] / "nnunet" / "fold_all" / "checkpoint_final.pth"
    command = [*train_command(data, tmp_path / "work", out), "--init", str(trained["weights"]), "--epochs", "1",
               "--dataset-id", "502"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    parent_plans = json.loads((trained["weights"] / "nnunet" / "plans.json").read_text())
    plans = json.loads((out / "nnunet" / "plans.json").read_text())
    assert plans["configurations"] == parent_plans["configurations"] and plans["dataset_name"].startswith("Dataset502")
    entry = json.loads((out / "MANIFEST.json").read_text())["files"]["nnunet/fold_all/checkpoint_final.pth"]
    assert entry["training"]["parent"]["checkpoint"] == str(parent_checkpoint)
    assert entry["training"]["schedule"]["learning_rate"] == 1e-3
    assert f"network weights from {parent_checkpoint}" in done.stdout + done.stderr
    # trained from the parent: one epoch moved the weights, but not far from where they started
    parent = torch.load(parent_checkpoint, weights_only=False)["network_weights"]
    tuned = torch.load(out / "nnunet" / "fold_all" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert parent.keys() == tuned.keys()
    assert any(not torch.equal(parent[k], tuned[k]) for k in parent)


def test_finetuning_needs_a_model_to_start_from(data, tmp_path):
    done = subprocess.run([*train_command(data, tmp_path / "work", tmp_path / "out"), "--init", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "no nnU-Net model" in done.stderr
