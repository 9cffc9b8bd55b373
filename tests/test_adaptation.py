"""Test-time batch-norm adaptation (core/adaptation.py): exact on the reference itself, undoes an intensity
change, restores the trained statistics between cases, and refuses what it cannot do."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_three_stage import dark_blob_scan, randomised, save_fixed_weights

from valdocmb.core import adaptation, three_stage
from valdocmb.core.errors import CaseError
from valdocmb.core.three_stage import ThreeStageConfig, ThreeStagePipeline
from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.train import stagewise


def crops(seed=0, n=4, shape=(20, 24, 24)):
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, 1.0, (n, 1, *shape)).astype(np.float32))


@pytest.mark.parametrize("net", [ScreeningFCN, DiscriminationCNN])
def test_adapting_to_its_own_reference_changes_nothing(net):
    model = randomised(net())
    batch = crops()
    before = [s.clone() for pair in adaptation.snapshot(model) for s in pair]
    adaptation.adapt_to_reference(model, batch, adaptation.reference_moments(model, [batch]))
    after = [s for pair in adaptation.snapshot(model) for s in pair]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_adaptation_undoes_a_scale_and_offset_of_the_intensities():
    """Valid convolutions without bias: a x + b moves every channel of C1 by a scale and an offset, which the first
    correction maps back; the network then sees what the reference saw, layer after layer."""
    model = randomised(ScreeningFCN())
    reference_batch = crops(1, shape=(24, 28, 28))
    with torch.no_grad():
        expected = model(reference_batch)
    reference = adaptation.reference_moments(model, [reference_batch])
    changed = 3.0 * reference_batch - 2.0
    with torch.no_grad():
        unadapted = (model(changed) - expected).abs().max()
    adaptation.adapt_to_reference(model, changed, reference)
    with torch.no_grad():
        adapted = (model(changed) - expected).abs().max()
    assert adapted < 1e-4 < unadapted / 100, (adapted, unadapted)


def test_moments_pool_by_summing():
    x = torch.randn(3, 5, 4, 4)
    whole = adaptation.channel_moments(x)
    np.testing.assert_allclose(whole, adaptation.channel_moments(x[:1]) + adaptation.channel_moments(x[1:]))
    mean, std = adaptation.mean_and_std(whole, 0.0)
    np.testing.assert_allclose(mean, x.double().mean((0, 2, 3)).numpy(), atol=1e-9)
    np.testing.assert_allclose(std, x.double().std((0, 2, 3), unbiased=False).numpy(), atol=1e-9)


def test_too_few_candidates_keep_the_trained_discrimination_statistics():
    volume = np.zeros((40, 40, 40), np.float32)
    few = [(20, 20, 20)] * (adaptation.MIN_CANDIDATES - 1)
    assert adaptation.discrimination_patches(volume, few, DiscriminationCNN.patch_size) is None
    many = [(20, 20, 20)] * (3 * adaptation.MAX_CANDIDATES)
    assert len(adaptation.discrimination_patches(volume, many, DiscriminationCNN.patch_size)) == \
        adaptation.MAX_CANDIDATES
    assert adaptation.screening_crops(volume, volume > 0) is None


def test_scan_batch_norm_needs_a_reference_and_enough_candidates_to_make_one(tmp_path):
    from valdocmb.bench import batch_norm

    weights, scans = tmp_path / "weights", tmp_path / "scans"
    save_fixed_weights(weights)
    with pytest.raises(CaseError, match="no batch-norm reference"):
        ThreeStagePipeline.from_weights(weights, "cpu", batch_norm="scan")
    scans.mkdir()
    scan = dark_blob_scan()
    sitk.WriteImage(scan, str(scans / "sub-301_space-T2S_desc-masked_T2S.nii.gz"))
    with pytest.raises(SystemExit, match="discrimination needs"):   # the blob gives too few candidates
        batch_norm.main(["--weights", str(weights), "--data", str(scans)])


def test_scan_batch_norm_on_a_reference_scan_gives_the_trained_result(tmp_path, monkeypatch):
    from valdocmb.bench import batch_norm

    monkeypatch.setattr(adaptation, "MIN_CANDIDATES", 1)
    weights, scans = tmp_path / "weights", tmp_path / "scans"
    save_fixed_weights(weights)
    scans.mkdir()
    scan = dark_blob_scan()
    sitk.WriteImage(scan, str(scans / "sub-301_space-T2S_desc-masked_T2S.nii.gz"))
    assert batch_norm.main(["--weights", str(weights), "--data", str(scans)]) == 0
    entry = json.loads((weights / "MANIFEST.json").read_text())[three_stage.BATCH_NORM_KEY]
    assert set(entry["moments"]) == {"screening", "discrimination"}
    assert len(entry["moments"]["screening"]) == len(adaptation.batch_norms(ScreeningFCN()))
    for runtime in ("torch", "openvino"):
        trained = ThreeStagePipeline.from_weights(weights, "cpu", runtime=runtime)
        adapted = ThreeStagePipeline.from_weights(weights, "cpu", runtime=runtime, batch_norm="scan")
        expected = sitk.GetArrayFromImage(trained.segment(scan, {}).mask)
        assert expected.sum() > 0
        assert np.array_equal(sitk.GetArrayFromImage(adapted.segment(scan, {}).mask), expected)
        # another scan (noisier: preprocessing undoes a mere scale and offset) adapts the networks; the next case
        # starts from the trained statistics
        noise = np.random.default_rng(5).normal(0, 20, scan.GetSize()[::-1]).astype(np.float32)
        other = sitk.GetImageFromArray(sitk.GetArrayFromImage(scan) + noise)
        other.CopyInformation(scan)
        adapted.segment(other, {})
        moved = adaptation.snapshot(adapted.screening)
        stored = adaptation.snapshot(trained.screening)
        assert any((a[0] - b[0]).abs().max() > 1e-3 for a, b in zip(moved, stored))
        adapted._restore_statistics()
        for a, b in zip(adaptation.snapshot(adapted.screening), stored):
            torch.testing.assert_close(a, b)
    # new weights: the reference was made for the old ones
    from valdocmb.core.weights import save_weights

    from fixed_weights import dark_spot_screening

    save_weights(dark_spot_screening(), weights / three_stage.WEIGHT_FILES["screening"], {"changed": True})
    with pytest.raises(CaseError, match="no batch-norm reference"):
        ThreeStagePipeline.from_weights(weights, "cpu", batch_norm="scan")
    with pytest.raises(CaseError, match="floating-point precision"):
        ThreeStagePipeline(randomised(ScreeningFCN()), DiscriminationCNN(), three_stage.SegmentationUNet(), "cpu",
                           ThreeStageConfig(precision="int8", runtime="openvino", adapt_batch_norm=True),
                           int8_ranges={"screening": [], "discrimination": []})


def test_stagewise_records_say_which_batch_norm_made_them():
    class Pipeline:
        config = ThreeStageConfig(adapt_batch_norm=True)

    assert stagewise.batch_norm_of(Pipeline()) == "scan"
    Pipeline.config = ThreeStageConfig()
    assert stagewise.batch_norm_of(Pipeline()) == "trained"
