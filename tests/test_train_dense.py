"""Streamed training: dense and shared arithmetic equal the per-patch formulation, targets, regions, the stream's
determinism, resumption after a kill, and the command writing loadable weights."""

import json

import numpy as np
import pytest
import torch

from valdocmb.core import openvino_runtime
from valdocmb.core.three_stage import ThreeStagePipeline
from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.train import dense, schedules, streamed
from valdocmb.train.__main__ import main as train_main
from valdocmb.train.stream import RegionStream, make_region

pytestmark = pytest.mark.slow  # minutes of training, simulation or a soak: `pytest -m "not slow"` skips them


def _grads(net):
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


def test_dense_screening_loss_and_gradients_equal_per_patch():
    torch.manual_seed(0)
    net = ScreeningFCN().double().eval()                 # batch norm in eval mode: positions are independent
    crop = torch.randn(2, 1, 22, 28, 26, dtype=torch.float64)
    out_shape = net(crop).shape[2:]
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.choice([dense.IGNORE, 0, 0, 0, 1], size=(2, *out_shape)))
    weights = dense.class_balanced_weights(target).double()
    loss = dense.position_loss(net(crop), target, weights)
    net.zero_grad()
    loss.backward()
    dense_grads = _grads(net)

    positions = np.argwhere(target.numpy() != dense.IGNORE)
    pz, py, px = ScreeningFCN.patch_size
    patches = torch.stack([crop[n, :, 2 * i:2 * i + pz, 2 * j:2 * j + py, 2 * k:2 * k + px]
                           for n, i, j, k in positions])
    index = tuple(torch.from_numpy(positions.T))
    net.zero_grad()
    patch_loss = dense.position_loss(net(patches).reshape(len(patches), 2), target[index], weights[index])
    patch_loss.backward()
    assert float(patch_loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-10)
    for a, b in zip(dense_grads, _grads(net)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_class_balanced_weights_give_each_class_its_share():
    target = torch.tensor([[1, 0, 0, 0, 0, dense.IGNORE, 0, 1]])
    weights = dense.class_balanced_weights(target)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[target == dense.IGNORE].sum()) == 0
    # 0.75 x 0.25 for the CMB class against 0.25 x 0.75 for background: equal halves, as the paper's sampling gives
    assert float(weights[target == 1].sum()) == pytest.approx(0.5)
    only_background = dense.class_balanced_weights(torch.zeros((1, 4), dtype=torch.long))
    assert float(only_background.sum()) == pytest.approx(1.0)


def test_hardest_negatives_keep_the_highest_scoring_background():
    logits = torch.zeros((1, 2, 6))
    logits[0, 1] = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.0])
    target = torch.tensor([[1, 0, 0, 0, 0, 0]])
    kept = dense.hardest_negatives(logits, target, 2)
    assert kept.tolist() == [[1, dense.IGNORE, 0, dense.IGNORE, 0, dense.IGNORE]]


def test_shared_discrimination_equals_each_shifted_patch_alone():
    torch.manual_seed(0)
    net = DiscriminationCNN().double().eval()
    regions = torch.randn(3, 1, *dense.DISCRIMINATION_REGION, dtype=torch.float64)
    shifts = dense.random_shifts(np.random.default_rng(0), 3, 5)
    assert shifts.abs().max() <= dense.MAX_SHIFT and (shifts[:, 0] == 0).all()
    shared = dense.shared_discrimination_logits(net, regions, shifts)
    shared.sum().backward()
    shared_grads = _grads(net)
    patches = dense.window_of(regions, shifts)
    # window (n, k) is the patch at offset MAX_SHIFT + shift in region n
    z, y, x = (shifts[1, 2] + dense.MAX_SHIFT).tolist()
    pz, py, px = DiscriminationCNN.patch_size
    torch.testing.assert_close(patches[7], regions[1, :, z:z + pz, y:y + py, x:x + px])
    net.zero_grad()
    alone = net(patches)
    alone.sum().backward()
    torch.testing.assert_close(shared, alone, rtol=1e-9, atol=1e-12)
    for a, b in zip(shared_grads, _grads(net)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_screening_targets_follow_the_patch_centres():
    label = np.zeros((30, 34, 34), np.uint8)
    label[14:17, 16:19, 16:19] = 1
    foreground = np.ones(label.shape, bool)
    foreground[:, :, :12] = False
    target = dense.screening_targets(label, foreground)
    assert target.shape == tuple(ScreeningFCN.output_size(n, p) for n, p in zip(label.shape, ScreeningFCN.patch_size))
    first = dense.patch_centre_offset()
    for index in np.ndindex(target.shape):
        centre = tuple(f + 2 * i for f, i in zip(first, index))
        if label[centre]:
            assert target[index] == 1
        elif not foreground[centre]:
            assert target[index] == dense.IGNORE
    assert (target == 1).any() and (target == 0).any()
    # next to the microbleed (inside the band) a position is neither class
    band = tuple((np.array([15, 20, 20]) - first) // 2)
    assert label[tuple(first + 2 * np.array(band))] == 0 and target[band] == dense.IGNORE


def test_rotation_keeps_labels_on_their_voxels():
    rng = np.random.default_rng(0)
    label = torch.zeros((4, 1, 8, 40, 40))
    label[:, :, 2:6, 10:22, 14:30] = 1
    volume = label * 3.0
    turned, turned_label = dense.rotate_and_flip(volume, label, rng)
    agree = ((turned > 1.5) == (turned_label > 0.5)).float().mean()
    assert agree > 0.98 and turned_label.sum() > 0.9 * label.sum()


@pytest.fixture(scope="module")
def region():
    return make_region(3, 0)


def test_a_region_is_a_z_scored_block_of_the_processing_grid(region):
    again = make_region(3, 0)
    np.testing.assert_array_equal(region.volume, again.volume)
    assert region.volume.shape == region.label.shape == region.foreground.shape
    assert not region.label[~region.foreground].any() and not region.volume[~region.foreground].any()
    values = region.volume[region.foreground].astype(np.float32)
    assert -3 < values.mean() < 3 and 0.2 < values.std() < 4
    assert all(region.foreground[c] for c, _ in region.sites)


def test_the_stream_is_a_function_of_seed_and_index():
    with RegionStream(5, start=1, workers=0) as stream:
        first = stream.take(2)
    assert [r.index for r in first] == [1, 2] and stream.position == 3
    np.testing.assert_array_equal(first[1].volume, make_region(5, 2).volume)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    schedule = schedules.StreamSchedule(4, 1, 1, screening_crops=2, buffer=2, validate_every=2, patience=5,
                                       validation_regions=1)
    monkeypatch.setattr(streamed, "CHECKPOINT_EVERY", 1)
    validation = streamed.validation_regions(tmp_path, 0, 1, 0, (0.49, 0.49, 0.8))
    cast, _ = dense.autocast(torch.device("cpu"), "float32")

    def run(work, kill_at=None):
        torch.manual_seed(0)
        stage = streamed.ScreeningStage(ScreeningFCN(), schedule, "cpu", cast)
        if kill_at:
            step, calls = stage.step, []

            def dying(buffer, rng):
                calls.append(1)
                if len(calls) == kill_at:
                    raise KeyboardInterrupt
                return step(buffer, rng)
            stage.step = dying
        streamed.run_stage(stage, 4, schedule, 0, work, "cpu", 0, (0.49, 0.49, 0.8), validation, cast)
        return stage.net

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=3)
    resumed = run(tmp_path / "killed")
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_valdocmb_train_without_data_writes_loadable_weights(tmp_path):
    out, work = tmp_path / "weights", tmp_path / "work"
    assert train_main(["--schedule", "smoke", "--out", str(out), "--work", str(work), "--workers", "0",
                       "--set", "validation_regions=1"]) == 0
    pipeline = ThreeStagePipeline.from_weights(out, "cpu")
    assert pipeline.weights_info["version"]
    entry = json.loads((out / "MANIFEST.json").read_text())["files"]["three_stage/screening.pt"]
    assert entry["learning_curve"]["validation"] and "recall@1fp" in entry["validation"]
    assert entry["training"]["regions"]["screening"]["regions"] >= 2
    # the same command again finds every stage done and writes the same weights
    digest = entry["sha256"]
    assert train_main(["--schedule", "smoke", "--out", str(out), "--work", str(work), "--workers", "0",
                       "--set", "validation_regions=1"]) == 0
    assert json.loads((out / "MANIFEST.json").read_text())["files"]["three_stage/screening.pt"]["sha256"] == digest
    # candidates per scan from the run's screening state at the threshold it chooses, beside the given weights'
    import SimpleITK as sitk
    from test_three_stage import dark_blob_scan

    from valdocmb.bench import training as bench_training

    sitk.WriteImage(dark_blob_scan(), str(tmp_path / "scan.nii.gz"))
    counted = bench_training.candidates(work, [tmp_path / "scan.nii.gz"], out, 0, 1)
    row = counted["scans"][0]
    assert row["shipped"]["threshold"] == pipeline.config.screening_threshold
    assert row["new"]["threshold"] == pytest.approx(pipeline.config.screening_threshold)   # what training chose
    assert counted["total"] == {name: row[name]["candidates"] for name in ("shipped", "new")}


def test_streamed_options_that_need_scans_are_refused(tmp_path, capsys):
    assert train_main(["--folds", "3", "--out", str(tmp_path / "w"), "--work", str(tmp_path)]) == 2
    assert train_main(["--schedule", "cpu", "--out", str(tmp_path / "w"), "--work", str(tmp_path)]) == 2


def test_the_screening_threshold_leaves_the_asked_false_peaks(monkeypatch):
    false = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1]
    monkeypatch.setattr(streamed, "screening_outputs", lambda *args: ([0.0], [0.95, 0.45, 0.25], false))
    chosen = streamed.choose_screening_threshold(None, [None, None], "cpu", None, 1.5)   # 3 false peaks allowed
    assert 0.3 < chosen["threshold"] <= 0.3001
    assert chosen["false_peaks_per_region"] == 1.5 and chosen["recall"] == pytest.approx(2 / 3)


def test_discrimination_figures_by_hand(monkeypatch):
    positives = np.array([0.9, 0.8, 0.7, 0.6, 0.2])     # 5 microbleeds
    assert streamed.threshold_at_recall(positives, 0.8) == 0.6     # 4 of 5 kept
    assert streamed.threshold_at_recall(positives, 0.81) == 0.2    # 5 needed
    assert streamed.threshold_at_recall(positives, 0.2) == 0.9
    by_kind = {"positive": positives.tolist(), "mined": [0.95, 0.65, 0.1], "mimic": [0.3], "random": [0.0]}
    monkeypatch.setattr(streamed, "discrimination_probabilities", lambda *args: by_kind)
    monkeypatch.setattr(streamed, "KEPT_AT_RECALLS", (0.8, 1.0))
    figures = streamed.discrimination_metrics(None, None, "cpu", None)
    # at 0.6 (recall 0.8) 2 of 5 negatives kept, at 0.2 (recall 1) 3 of 5
    assert figures["kept_at_recall"] == pytest.approx((2 / 5 + 3 / 5) / 2)
    assert figures["sensitivity"] == 0.8 and figures["mined_kept"] == pytest.approx(2 / 3)
    chosen = streamed.choose_discrimination_threshold(None, None, "cpu", None, recall=0.8)
    assert chosen["threshold"] == 0.5 and chosen["recall"] == 0.8 and chosen["negatives_kept"] == 0.4  # capped
    chosen = streamed.choose_discrimination_threshold(None, None, "cpu", None, recall=1.0)
    assert chosen["threshold"] == 0.2 and chosen["recall"] == 1.0 and chosen["negatives_kept"] == 0.6


def test_weights_carry_their_thresholds(tmp_path):
    from valdocmb.core.three_stage import WEIGHT_FILES
    from valdocmb.core.weights import default_weights_dir, save_weights
    from valdocmb.models.segmentation import SegmentationUNet

    nets = {"screening": ScreeningFCN(), "discrimination": DiscriminationCNN(), "segmentation": SegmentationUNet()}
    for name, net in nets.items():
        meta = {"target_spacing": [0.49, 0.49, 0.8]}
        if name == "screening":
            meta["screening_threshold"] = 0.37
        if name == "discrimination":
            meta["discrimination_threshold"] = 0.21
        save_weights(net, tmp_path / WEIGHT_FILES[name], meta)
    config = ThreeStagePipeline.from_weights(tmp_path, "cpu", lesion_rule=False).config
    assert (config.screening_threshold, config.discrimination_threshold) == (0.37, 0.21)
    # the shipped weights carry none: the defaults stay
    config = ThreeStagePipeline.from_weights(default_weights_dir(), "cpu").config
    assert (config.screening_threshold, config.discrimination_threshold) == (0.1, 0.5)


def test_region_labels_lie_on_the_dark_blobs_they_label():
    from scipy import ndimage

    from valdocmb.synth.region import simulate_regions

    blobs = 0
    for region in simulate_regions(8, "alfa3", 3, cmb_per_region=(3, 3)):  # some microbleeds are too faint to see
        components, count = ndimage.label(region.label, np.ones((3, 3, 3)))
        for i in range(1, count + 1):
            blob = components == i
            shell = ndimage.binary_dilation(blob, iterations=3) & ~blob & region.foreground
            # the labelled voxels are the dark ones, not a displaced copy of them
            assert region.volume[blob].mean() < region.volume[shell].mean() - 0.5
            blobs += 1
    assert blobs >= 2


def test_a_stage_is_kept_by_its_recent_validations_not_one_lucky_check():
    history = [{"step": 1, "loss": 0.3}]   # training entries carry no validation
    kept = []
    for step, loss in enumerate([0.5, 0.1, 0.45, 0.3, 0.28, 0.2], 1):
        history.append({"step": step, "validation": {"loss": loss}})
        kept.append(round(streamed.selection_score(history, "loss"), 4))
    assert streamed.SELECTION_WINDOW == 3
    assert kept == [0.5, 0.3, 0.35, 0.2833, 0.3433, 0.26]   # the lone 0.1 no longer wins for good


def test_ablation_profile_mix_changes_only_the_profile(monkeypatch):
    """standard_share (issue 31's data-variety ablation) changes which profile a case draws, nothing else; the
    default schedule draws exactly as PROFILE_MIX, so a run in progress resumes on the same regions."""
    from types import SimpleNamespace

    from valdocmb.synth import region as synth_region
    from valdocmb.synth import simulate as synth_simulate
    from valdocmb.train import stream

    calls = []

    def fake(case_seed, grid, count, target_spacing, **profile):
        calls.append((case_seed, grid, profile == synth_simulate.PROFILES["standard"]))
        shape = (2, 2, 2)
        return [SimpleNamespace(volume=np.zeros(shape), label=np.zeros(shape, np.uint8),
                                foreground=np.ones(shape, bool), sites=[], meta={}) for _ in range(count)]

    monkeypatch.setattr(synth_region, "simulate_regions", fake)
    assert schedules.STREAM_SCHEDULES["full"].profile_mix() == stream.PROFILE_MIX
    draws = {}
    for share in (None, 1.0, 0.0):
        calls.clear()
        mix = None if share is None else schedules.stream_schedule_with(
            schedules.STREAM_SCHEDULES["full"], [f"standard_share={share}"]).profile_mix()
        profiles = [stream.make_case(7, case, profile_mix=mix)[0].meta["profile"] for case in range(12)]
        draws[share] = ([c[:2] for c in calls], profiles)
    assert draws[None][0] == draws[1.0][0] == draws[0.0][0]            # the same case seeds and grids
    assert set(draws[1.0][1]) == {"standard"} and set(draws[0.0][1]) == {"randomised"}
    assert set(draws[None][1]) == {"standard", "randomised"}
    with pytest.raises(SystemExit, match="standard_share"):
        schedules.stream_schedule_with(schedules.STREAM_SCHEDULES["full"], ["standard_share=1.5"])
    assert schedules.stream_schedule_with(schedules.STREAM_SCHEDULES["full"],
                                          ["hard_negative_sites=0"]).hard_negative_sites == 0
    assert schedules.stream_schedule_with(schedules.STREAM_SCHEDULES["full"], ["cooldown=0"]).cooldown == 0
    with pytest.raises(SystemExit, match="cooldown"):
        schedules.stream_schedule_with(schedules.STREAM_SCHEDULES["full"], ["cooldown=2"])


def test_without_hard_negative_sites_negatives_are_random_brain_points():
    sites = {"positive": [(1, 1, 1)], "mined": [(2, 2, 2)], "mimic": [(3, 3, 3)], "random": [(4, 4, 4)]}
    draws = streamed.draw_sites([("region", sites)], 200, 0.5, np.random.default_rng(0), streamed.RANDOM)
    assert {centre for _, centre, label in draws if label == 0} == {(4, 4, 4)}
    assert {centre for _, centre, label in draws if label == 1} == {(1, 1, 1)}


@pytest.mark.skipif(not openvino_runtime.available(), reason="OpenVINO is not installed")
def test_mining_on_openvino_equals_torch():
    torch.manual_seed(0)
    net = ScreeningFCN().eval()
    volume = np.random.default_rng(0).normal(size=(28, 36, 36)).astype(np.float16)
    exact = streamed.screening_probabilities(net, volume, "cpu", dense.autocast(torch.device("cpu"), "float32")[0])
    fast = streamed.ScreeningScorer(net, "cpu", None, "float32")
    np.testing.assert_allclose(fast(volume), exact, atol=1e-5)
    assert fast(volume).shape == exact.shape == (14, 18, 18)
    cast, _ = dense.autocast(torch.device("cpu"), "bfloat16")
    np.testing.assert_allclose(streamed.ScreeningScorer(net, "cpu", cast, "bfloat16")(volume), exact, atol=2e-2)


def test_segmentation_validation_counts_what_the_unet_draws_on_hard_negatives():
    from types import SimpleNamespace

    class Threshold(torch.nn.Module):   # CMB wherever the input is 1
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), 40 * (x - 0.5)], 1)

    volume = np.zeros((40, 60, 60), np.float32)
    label = np.zeros(volume.shape, np.uint8)
    volume[10:12, 10:12, 10:12] = label[10:12, 10:12, 10:12] = 1    # a microbleed of 8 voxels, drawn exactly
    volume[30:33, 40:43, 40:43] = 1                                  # a mimic the U-Net draws: 27 voxels
    region = SimpleNamespace(volume=volume, label=label)
    sites = {"positive": [(10, 10, 10)], "mimic": [(31, 41, 41)], "mined": [], "random": [(20, 50, 50)]}
    figures = streamed.segmentation_metrics(Threshold(), [(region, sites)], "cpu", dense.autocast(
        torch.device("cpu"), "float32")[0])
    assert figures["dice"] == pytest.approx(1.0)
    assert figures["negative_voxels"] == pytest.approx(27.0)
    assert figures["loss"] == pytest.approx(1 - (2 * 8 + 1) / (8 + 27 + 8 + 1), abs=1e-4)


def test_a_stalled_stage_cools_down_from_its_kept_state_and_resumes_there(tmp_path, monkeypatch):
    # 12 steps, a check every 2; validation peaks at step 2, so at step 4 (patience 1, after a quarter) the stage
    # cools down from step 2's state over 6 steps (half the budget), the learning rate going linearly to zero
    schedule = schedules.StreamSchedule(12, 1, 1, screening_crops=2, buffer=2, validate_every=2, patience=1,
                                       stop_after=0.25, cooldown=0.5, validation_regions=1)
    monkeypatch.setattr(streamed, "CHECKPOINT_EVERY", 1)
    validation = streamed.validation_regions(tmp_path, 0, 1, 0, (0.49, 0.49, 0.8))
    cast, _ = dense.autocast(torch.device("cpu"), "float32")
    figures = {2: 0.9, 4: 0.5, 6: 0.9, 8: 0.95, 10: 0.97}   # froc by step: higher is better

    def run(work, kill_at=None):
        torch.manual_seed(0)
        stage = streamed.ScreeningStage(ScreeningFCN(), schedule, "cpu", cast)
        ckpt = work / "screening.ckpt"
        done = torch.load(ckpt, weights_only=False)["step"] if ckpt.is_file() else 0   # steps before a kill
        steps = []
        stage.validate = lambda validation: {"froc": figures.get(steps[-1], 0.3)}
        step, calls = stage.step, []

        def counted(buffer, rng):
            calls.append(1)
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            steps.append(done + len(calls))
            return step(buffer, rng)
        stage.step = counted
        return stage, streamed.run_stage(stage, 12, schedule, 0, work, "cpu", 0, (0.49, 0.49, 0.8), validation,
                                         cast)

    stage, history = run(tmp_path / "whole")
    rates = {e["step"]: e["lr"] for e in history if "lr" in e}
    assert max(rates) == 10 and rates[5] > rates[6] > rates[10] > 0          # cooling 4 -> 10
    assert rates[5] == pytest.approx(rates[10] * 6)                          # linear to zero at step 10
    saved = torch.load(tmp_path / "whole" / "screening.ckpt", weights_only=False)
    assert saved["cooldown"]["from_state"] == 2 and saved["cooldown"]["to_step"] == 10
    # the cool-down's checks compete once they fill the 3-check window, here at its end: step 8's mean of 0.925
    # beat step 2's 0.9 (the main phase's window then held step 2 alone) but did not count yet; step 10's 0.94 does
    assert stage.kept_step == 10
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=7)
    resumed, _ = run(tmp_path / "killed")
    for a, b in zip(stage.net.state_dict().values(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b)
