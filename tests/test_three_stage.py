import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from valdocmb.core import run, three_stage
from valdocmb.core.device import activation_bytes, cpu_has_bfloat16
from valdocmb.core.errors import CaseError
from valdocmb.core.patches import add_patches, extract_patches
from valdocmb.core.three_stage import WEIGHT_FILES, ThreeStageConfig, ThreeStagePipeline, cuda_fp32_precision
from valdocmb.core.weights import default_weights_dir, load_weights, save_weights, sha256
from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.models.segmentation import SegmentationUNet

from conftest import make_image, rotation
from fixed_weights import dark_spot_discrimination, dark_spot_screening, dark_spot_segmentation

ROOT = Path(__file__).resolve().parent.parent


def randomised(net, seed=0):
    """Random weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("shape,block", [((13, 15, 17), 5), ((16, 20, 20), 8), ((9, 11, 30), 6), ((40, 22, 19), 5)])
def test_screening_fcn_equals_patch_classifier_everywhere(shape, block):
    net = randomised(ScreeningFCN())
    config = ThreeStageConfig(screening_block=block, batch_size=3)     # several batches of blocks per row
    pipeline = ThreeStagePipeline(net, DiscriminationCNN(), SegmentationUNet(), "cpu", config)
    volume = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    scores = pipeline.screen(volume, np.ones(shape, bool))
    assert scores.shape == tuple(-(-np.array(shape) // 2))   # one score per even voxel, borders included

    centres = np.argwhere(np.ones(scores.shape, bool)) * 2
    patches = extract_patches(volume, centres, ScreeningFCN.patch_size)
    with torch.no_grad():
        logits = net(torch.from_numpy(patches)[:, None])
    assert logits.shape[2:] == (1, 1, 1)
    expected = torch.softmax(logits[:, :, 0, 0, 0], 1)[:, 1].numpy().reshape(scores.shape)
    np.testing.assert_allclose(scores, expected, atol=2e-6)


def test_screening_skips_tiles_outside_the_brain():
    net = randomised(ScreeningFCN())
    pipeline = ThreeStagePipeline(net, DiscriminationCNN(), SegmentationUNet(), "cpu",
                                  ThreeStageConfig(screening_block=5))
    volume = np.random.default_rng(2).normal(size=(12, 12, 12)).astype(np.float32)
    brain = np.zeros(volume.shape, bool)
    brain[:4, :4, :4] = True
    scores = pipeline.screen(volume, brain)
    assert np.all(scores[2:, :, :] == 0) and np.all(scores[:, 2:, :] == 0)
    assert np.all(scores[:2, :2, :2] > 0)


@pytest.mark.parametrize("shift", [1, 0, 2])
def test_shared_discrimination_equals_classifying_every_shifted_patch(shift):
    """C1-C2 once per candidate region, then each shift's window: the probabilities of the per-patch path."""
    net = randomised(DiscriminationCNN(), seed=3)
    config = ThreeStageConfig(discrimination_shift=shift, batch_size=16)
    pipeline = ThreeStagePipeline(ScreeningFCN(), net, SegmentationUNet(), "cpu", config)
    volume = np.random.default_rng(4).normal(size=(23, 29, 31)).astype(np.float32)
    # odd positions, the borders and corners of the volume included (patches reach beyond it: zero padding)
    centres = np.array([(0, 0, 0), (22, 28, 30), (11, 14, 15), (1, 27, 3), (21, 1, 29), (5, 6, 7), (12, 13, 14)])
    shared = pipeline.discriminate(volume, centres)

    shifts = pipeline.discrimination_shifts()
    positions = (centres[:, None, :] + shifts[None]).reshape(-1, 3)
    patches = extract_patches(volume, positions, DiscriminationCNN.patch_size)
    with torch.no_grad():
        per_patch = torch.softmax(net(torch.from_numpy(patches)[:, None]), 1)[:, 1].numpy()
    np.testing.assert_allclose(shared, per_patch.reshape(len(centres), len(shifts)).mean(1), atol=1e-6)



def test_screening_cut_to_the_brain_equals_the_whole_volume_fcn_inside_it():
    net = randomised(ScreeningFCN(), seed=5)
    volume = np.random.default_rng(6).normal(size=(26, 34, 30)).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in volume.shape], indexing="ij")
    brain = (zz / 0.7) ** 2 + ((yy - 0.2) / 0.6) ** 2 + (xx / 0.5) ** 2 < 1   # an off-centre ellipsoid
    # the FCN over the whole volume, zero-padded by half a patch in front as screening defines it
    before = np.array(ScreeningFCN.patch_size) // 2
    after = 2 * (-(-np.array(volume.shape) // 2) - 1) + np.array(ScreeningFCN.patch_size) - volume.shape - before
    padded = np.pad(volume, list(zip(before, after)))
    with torch.no_grad():
        everywhere = torch.softmax(net(torch.from_numpy(padded)[None, None]), 1)[0, 1].numpy()
    for block in (5, 7):
        cut = ThreeStagePipeline(net, DiscriminationCNN(), SegmentationUNet(), "cpu",
                                 ThreeStageConfig(screening_block=block, batch_size=4)).screen(volume, brain)
        np.testing.assert_allclose(cut, everywhere * brain[::2, ::2, ::2], atol=2e-6)


def test_screening_blocks_smaller_than_a_scores_reach_are_refused():
    pipeline = ThreeStagePipeline(ScreeningFCN(), DiscriminationCNN(), SegmentationUNet(), "cpu",
                                  ThreeStageConfig(screening_block=4))
    with pytest.raises(CaseError, match="screening_block"):
        pipeline.screen(np.ones((12, 12, 12), np.float32))


def test_networks_take_the_documented_patch_sizes():
    assert DiscriminationCNN()(torch.zeros(2, 1, 20, 24, 24)).shape == (2, 2)
    assert SegmentationUNet()(torch.zeros(2, 1, 24, 32, 32)).shape == (2, 2, 24, 32, 32)
    assert ScreeningFCN()(torch.zeros(1, 1, 16, 20, 20)).shape == (1, 2, 1, 1, 1)


def test_non_maximum_suppression_keeps_the_highest_of_neighbours():
    pipeline = ThreeStagePipeline(ScreeningFCN(), DiscriminationCNN(), SegmentationUNet(), "cpu",
                                  ThreeStageConfig(screening_threshold=0.1, nms_radius=2))
    scores = np.zeros((10, 10, 10), np.float32)
    scores[5, 5, 5], scores[5, 5, 6], scores[5, 5, 8] = 0.9, 0.95, 0.5   # 8 is 2 away from 6: suppressed
    scores[1, 1, 1] = 0.3
    scores[8, 8, 8] = 0.05                                                # below threshold
    found = pipeline.find_candidates(scores)
    assert [c.centre for c in found] == [(10, 10, 12), (2, 2, 2)]        # score voxels x stride 2
    assert [c.screening_score for c in found] == pytest.approx([0.95, 0.3])


def test_add_patches_inverts_extract_patches_at_borders():
    volume = np.arange(7 * 8 * 9, dtype=np.float32).reshape(7, 8, 9)
    centres = [(0, 0, 0), (6, 7, 8), (3, 4, 4)]
    patches = extract_patches(volume, centres, (4, 6, 6))
    total, counts = np.zeros_like(volume), np.zeros_like(volume)
    add_patches(total, counts, patches, centres)
    covered = counts > 0
    np.testing.assert_array_equal(total[covered] / counts[covered], volume[covered])
    assert extract_patches(volume, [(0, 0, 0)], (4, 6, 6))[0, 0, 0, 0] == 0   # outside reads as zero



@pytest.mark.parametrize("size", [(4, 6, 6), (5, 7, 3), (20, 24, 24)])
def test_extract_patches_equals_cutting_from_the_zero_padded_volume(size):
    """Centres inside, on every edge and wholly outside (the patch misses the volume): zeros beyond the edges."""
    volume = np.random.default_rng(0).normal(size=(7, 8, 9)).astype(np.float32)
    centres = [(0, 0, 0), (6, 7, 8), (3, 4, 4), (-30, 4, 4), (3, 40, 4), (7, 0, 9), (-1, -2, 10)]
    pad = 64
    padded = np.pad(volume, pad)
    expected = [padded[tuple(slice(c + pad - n // 2, c + pad - n // 2 + n) for c, n in zip(centre, size))]
                for centre in centres]
    np.testing.assert_array_equal(extract_patches(volume, centres, size), np.stack(expected))

def dark_blob_scan(spacing=(0.98, 0.98, 1.6), direction=None, blob=(9, 20, 14), seed=3):
    """A head filling the grid (no brain edge), noise around 100, one dark blob darkest at its centre."""
    shape = (20, 36, 30)
    rng = np.random.default_rng(seed)
    array = rng.normal(100.0, 4.0, shape).astype(np.float32)
    if blob is not None:
        zz, yy, xx = np.indices(shape)
        r_mm = np.sqrt(((zz - blob[0]) * spacing[2]) ** 2 + ((yy - blob[1]) * spacing[1]) ** 2
                       + ((xx - blob[2]) * spacing[0]) ** 2)
        array -= 85.0 * np.exp(-(r_mm**2) / 2.0)
    return make_image(array, spacing, (4.0, -7.0, 2.0), direction)


def fixed_pipeline(**config):
    return ThreeStagePipeline(dark_spot_screening(), dark_spot_discrimination(), dark_spot_segmentation(), "cpu",
                              ThreeStageConfig(**config))


@pytest.mark.parametrize("direction", [None, rotation(0, 0, 30), np.diag([-1.0, 1.0, -1.0])])
def test_dark_blob_comes_out_where_it_was_put(direction):
    blob = (9, 20, 14)
    scan = dark_blob_scan(direction=direction, blob=blob)
    pipeline = fixed_pipeline()
    result, detection = pipeline.segment_with_detection(scan, {})
    mask = result.mask
    assert mask.GetSize() == scan.GetSize() and mask.GetOrigin() == scan.GetOrigin()
    assert mask.GetDirection() == scan.GetDirection() and mask.GetSpacing() == scan.GetSpacing()
    labels, n = ndimage.label(sitk.GetArrayFromImage(mask))
    assert n == 1
    centre = ndimage.center_of_mass(labels > 0)
    assert np.allclose(centre, blob, atol=1.0)
    assert len(detection.survivors) >= 1 and all(c.discrimination_score >= 0.5 for c in detection.survivors)
    # The strongest candidate itself (not only the U-Net's local response) sits on the blob in world space.
    best = max(detection.survivors, key=lambda c: c.screening_score)
    blob_world = scan.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in blob[::-1]))
    assert np.linalg.norm(detection.preprocessed.voxel_to_world(best.centre) - blob_world) < 1.5


def test_bfloat16_precision_finds_the_same_blob_and_is_opt_in():
    scan = dark_blob_scan()
    exact = fixed_pipeline().segment(scan, {})
    fast = fixed_pipeline(precision="bfloat16").segment(scan, {})
    assert np.array_equal(sitk.GetArrayFromImage(fast.mask), sitk.GetArrayFromImage(exact.mask))
    np.testing.assert_allclose(sitk.GetArrayFromImage(fast.probability), sitk.GetArrayFromImage(exact.probability),
                               atol=0.05)
    assert ThreeStageConfig().precision == "float32"
    with pytest.raises(CaseError, match="unknown precision"):
        fixed_pipeline(precision="int4").segment(scan, {})


@pytest.mark.parametrize("mode", ["float16", "tf32"])
def test_cuda_only_precisions_fall_back_to_float32_on_cpu(mode, caplog):
    pipeline = fixed_pipeline(precision=mode)
    assert pipeline.config.precision == "float32" and "needs a CUDA device" in caplog.text
    assert pipeline.describe()["config"]["precision"] == "float32"     # run.json says what ran


@pytest.mark.parametrize("native,expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native, expected):
    monkeypatch.setattr(three_stage, "cpu_has_bfloat16", lambda: native)
    assert fixed_pipeline(precision="auto").config.precision == expected
    config = ThreeStageConfig(precision="auto")  # the caller's config is left as it was given
    ThreeStagePipeline(dark_spot_screening(), dark_spot_discrimination(), dark_spot_segmentation(), "cpu", config)
    assert config.precision == "auto"


def test_cpu_bfloat16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert cpu_has_bfloat16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f\n")
    assert not cpu_has_bfloat16(cpuinfo) and not cpu_has_bfloat16(tmp_path / "missing")


def test_command_line_precision_defaults_to_auto(monkeypatch):
    monkeypatch.delenv("CMB_PRECISION")
    assert run.parse_arguments([]).precision == "auto"


def test_cuda_float32_context_sets_and_restores_the_tf32_flags():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with cuda_fp32_precision("ieee"):
        assert conv.fp32_precision == matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_nothing_found_in_a_scan_without_blob():
    mask = fixed_pipeline().segment(dark_blob_scan(blob=None), {}).mask
    assert sitk.GetArrayFromImage(mask).sum() == 0


def test_thresholds_are_parameters():
    scan = dark_blob_scan()
    assert sitk.GetArrayFromImage(fixed_pipeline(discrimination_threshold=1.01).segment(scan, {}).mask).sum() == 0
    assert sitk.GetArrayFromImage(fixed_pipeline(screening_threshold=1.01).segment(scan, {}).mask).sum() == 0
    assert sitk.GetArrayFromImage(fixed_pipeline(segmentation_threshold=1.01).segment(scan, {}).mask).sum() == 0


def save_fixed_weights(folder):
    nets = {"screening": dark_spot_screening(), "discrimination": dark_spot_discrimination(),
            "segmentation": dark_spot_segmentation()}
    for name, net in nets.items():
        save_weights(net, folder / WEIGHT_FILES[name], {"target_spacing": [0.49, 0.49, 0.8]})


def test_process_py_runs_the_three_stage_method_from_weights(tmp_path):
    weights, inp, out = tmp_path / "weights", tmp_path / "in", tmp_path / "out"
    save_fixed_weights(weights)
    inp.mkdir()
    sitk.WriteImage(dark_blob_scan(), str(inp / "sub-201_space-T2S_desc-masked_T2S.nii.gz"))
    code = run.main(["--input", str(inp), "--output", str(out), "--weights", str(weights), "--device", "cpu"])
    assert code == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / "sub-201_space-T2S_prediction.nii.gz")))
    assert mask[9, 20, 14] == 1 and ndimage.label(mask)[1] == 1


def test_weight_files_are_checked(tmp_path):
    save_fixed_weights(tmp_path)
    with pytest.raises(CaseError, match="segmentation.pt: a three-stage weight file is missing"):
        (tmp_path / WEIGHT_FILES["segmentation"]).unlink()
        ThreeStagePipeline.from_weights(tmp_path, "cpu")
    (tmp_path / WEIGHT_FILES["segmentation"]).write_bytes(b"not a torch file")
    with pytest.raises(CaseError, match="segmentation.pt: cannot be loaded"):
        ThreeStagePipeline.from_weights(tmp_path, "cpu")
    with pytest.raises(CaseError, match="holds a ScreeningFCN, expected DiscriminationCNN"):
        load_weights(DiscriminationCNN(), tmp_path, WEIGHT_FILES["screening"])
    (tmp_path / "MANIFEST.json").write_text(
        '{"files": {"three_stage/screening.pt": {"sha256": "%s"}}}' % ("0" * 64))
    with pytest.raises(CaseError, match="sha256 differs"):
        load_weights(ScreeningFCN(), tmp_path, WEIGHT_FILES["screening"])
    real = sha256(tmp_path / WEIGHT_FILES["screening"])
    (tmp_path / "MANIFEST.json").write_text('{"files": {"three_stage/screening.pt": {"sha256": "%s"}}}' % real)
    load_weights(ScreeningFCN(), tmp_path, WEIGHT_FILES["screening"])


def test_saved_weights_hold_no_optimizer_state(tmp_path):
    save_weights(ScreeningFCN(), tmp_path / "s.pt", {"note": "x"})
    checkpoint = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(checkpoint) == {"architecture", "state_dict", "meta"}


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CaseError, match="no CUDA device"):
        ThreeStagePipeline(ScreeningFCN(), DiscriminationCNN(), SegmentationUNet(), "cuda")


def test_auto_device_says_why_a_cuda_build_runs_on_cpu(monkeypatch, caplog):
    from valdocmb.core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert resolve_device("auto").type == "cpu"
    assert "built for CUDA 13.0 but sees no usable GPU" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: CPU is what was installed, nothing to say
    assert resolve_device("auto").type == "cpu" and caplog.text == ""


def test_process_py_writes_only_to_the_output_and_temp_folders(tmp_path):
    """As in the container: HOME, caches and TMPDIR point into one temp folder, the input is read-only."""
    import os
    import subprocess
    import sys

    weights, inp, out, scratch, cwd = (tmp_path / n for n in ("weights", "in", "out", "tmp", "cwd"))
    save_fixed_weights(weights)
    for folder in (inp, scratch, cwd):
        folder.mkdir()
    sitk.WriteImage(dark_blob_scan(), str(inp / "patient.nii.gz"))
    inp.chmod(0o555)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    env = {**os.environ, "HOME": str(scratch), "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(scratch / ".cache"),
           "MPLCONFIGDIR": str(scratch / "matplotlib")}
    done = subprocess.run([sys.executable, str(ROOT / "process.py"), "--input", str(inp), "--output", str(out),
                           "--weights", str(weights), "--device", "cpu"], cwd=cwd, env=env, capture_output=True,
                          text=True)
    inp.chmod(0o755)
    assert done.returncode == 0, done.stderr[-2000:]
    # progress goes to stdout and warnings to stderr (as grand-challenge reads them), results only to files
    assert "INFO" not in done.stderr and "done: 1 of 1 case(s) written" in done.stdout
    changed = [p for p in tmp_path.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    outside = [p for p in changed if not (p.is_relative_to(out) or p.is_relative_to(scratch))]
    assert outside == [] and (out / "patient_CMB.nii.gz").is_file()


def test_activation_bytes_counts_every_layer_output_without_computing():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool3d(2))
    # conv (4, 8, 8, 8), relu the same, pool (4, 4, 4, 4): float32
    assert activation_bytes(net, lambda n, x: n(x), (1, 10, 10, 10)) == 4 * (2 * 4 * 8 ** 3 + 4 * 4 ** 3)
    assert next(net.parameters()).device.type == "cpu"             # the network itself is untouched


def test_items_per_call_from_free_cuda_memory(monkeypatch):
    pipeline = ThreeStagePipeline(ScreeningFCN(), DiscriminationCNN(), SegmentationUNet(), "cpu")
    assert pipeline.items_per_call("screening") == 64 and pipeline.items_per_call("discrimination") == 64 // 7
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    pipeline.device = torch.device("cuda")
    per_candidate = pipeline._bytes_per_item("discrimination")
    assert 5 * 2**20 < per_candidate < 100 * 2**20
    assert pipeline.items_per_call("discrimination") == 8 * 2**30 // 4 // per_candidate
    assert pipeline.items_per_call("segmentation") >= 1
    pipeline.config.batch_size = 14                                   # a configured size wins
    assert pipeline.items_per_call("segmentation") == 14 and pipeline.items_per_call("discrimination") == 2



def test_openvino_discrimination_takes_more_candidates_per_call_unless_told():
    config = ThreeStageConfig(runtime="openvino")
    pipeline = ThreeStagePipeline(ScreeningFCN(), DiscriminationCNN(), SegmentationUNet(), "cpu", config)
    assert pipeline.items_per_call("discrimination") == 32 and pipeline.items_per_call("screening") == 64
    pipeline.config.batch_size = 14
    assert pipeline.items_per_call("discrimination") == 2

def test_benchmark_times_variants_in_their_own_processes(tmp_path, capsys):
    from valdocmb.bench import three_stage as bench

    example = sitk.ReadImage(str(bench.EXAMPLE))
    scan = tmp_path / "small_T2S.nii.gz"
    sitk.WriteImage(example[40:72, 40:72, 10:22], str(scan))
    report = tmp_path / "bench.json"
    same_weights = f"three-stage@{default_weights_dir()}"   # a variant may name its own weights folder
    assert bench.main(["--scan", str(scan), "--simulate", "--variants", "three-stage", "three-stage:bfloat16",
                       same_weights, "--threads", "1", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["scans"]["small_T2S.nii.gz"]
    assert [r["variant"] for r in rows] == ["three-stage", "three-stage:bfloat16", same_weights]
    assert rows[0]["ratio_to_first"] == 1.0 and rows[0]["voxels_differing_from_first_of_method"] == 0
    assert rows[2]["voxels_differing_from_first_of_method"] == 0
    assert set(rows[0]["stages"]) >= {"screening", "discrimination", "segmentation"}
    assert "three-stage:bfloat16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--variants", "nnunet:float16"])
    with pytest.raises(SystemExit):
        bench.main(["--variants", f"three-stage@{tmp_path / 'absent'}"])


@pytest.mark.parametrize("shift", [1, 0, 2])
def test_openvino_runtime_computes_what_torch_computes(shift):
    """The stacks rebuilt on OpenVINO (batch norm folded in, the shifted windows cut inside OpenVINO) give torch's
    scores and probabilities in float32."""
    screening, discrimination = randomised(ScreeningFCN(), seed=7), randomised(DiscriminationCNN(), seed=8)
    volume = np.random.default_rng(9).normal(size=(21, 30, 27)).astype(np.float32)
    brain = np.zeros(volume.shape, bool)
    brain[3:18, 4:26, 2:25] = True
    centres = np.array([(0, 0, 0), (20, 29, 26), (10, 15, 13), (3, 4, 5)])
    results = {}
    for runtime in ("torch", "openvino"):
        config = ThreeStageConfig(screening_block=5, batch_size=7, discrimination_shift=shift, runtime=runtime)
        pipeline = ThreeStagePipeline(screening, discrimination, SegmentationUNet(), "cpu", config)
        assert pipeline.config.runtime == runtime
        results[runtime] = pipeline.screen(volume, brain), pipeline.discriminate(volume, centres)
    np.testing.assert_allclose(results["openvino"][0], results["torch"][0], atol=1e-5)
    np.testing.assert_allclose(results["openvino"][1], results["torch"][1], atol=1e-5)


def test_openvino_bfloat16_finds_the_same_blob():
    scan = dark_blob_scan()
    exact = fixed_pipeline().segment(scan, {})
    fast = fixed_pipeline(precision="bfloat16", runtime="openvino").segment(scan, {})
    assert np.array_equal(sitk.GetArrayFromImage(fast.mask), sitk.GetArrayFromImage(exact.mask))


def test_runtime_auto_is_openvino_on_a_cpu_where_it_can_run(monkeypatch, caplog):
    config = ThreeStageConfig(runtime="auto")
    pipeline = ThreeStagePipeline(dark_spot_screening(), dark_spot_discrimination(), dark_spot_segmentation(), "cpu",
                                  config)
    assert pipeline.config.runtime == "openvino" and config.runtime == "auto"   # the caller's config is left alone
    assert pipeline.describe()["config"]["runtime"] == "openvino"              # run.json says what ran
    monkeypatch.setattr(three_stage.openvino_runtime, "available", lambda: False)
    assert fixed_pipeline(runtime="auto").config.runtime == "torch"
    with pytest.raises(CaseError, match="openvino package is not installed"):
        fixed_pipeline(runtime="openvino")
    with pytest.raises(CaseError, match="unknown runtime"):
        fixed_pipeline(runtime="onnx")


def test_command_line_runtime_defaults_to_auto(monkeypatch):
    assert run.parse_arguments([]).runtime == "auto"
    monkeypatch.setenv("CMB_RUNTIME", "torch")
    assert run.parse_arguments([]).runtime == "torch"


def test_openvino_stacks_refuse_layers_they_do_not_rebuild():
    from valdocmb.core.openvino_runtime import compile_stack

    with pytest.raises(ValueError, match="Sigmoid"):
        compile_stack([torch.nn.Sigmoid()], 1, "float32", 1)
    with pytest.raises(ValueError, match="padded"):
        compile_stack([torch.nn.MaxPool3d(2, padding=1)], 1, "float32", 1)


def test_input_ranges_are_each_convolutions_input_widened_by_the_margin():
    from valdocmb.core.openvino_runtime import input_ranges

    first, second = torch.nn.Conv3d(1, 1, 1), torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        first.weight.fill_(2.0), first.bias.zero_(), second.weight.fill_(1.0), second.bias.zero_()
    x = torch.tensor([-1.0, 0.5, 3.0]).reshape(1, 1, 3, 1, 1)
    found = input_ranges([first, torch.nn.LeakyReLU(0.01), second], [x, x / 2], margin=1.25)
    np.testing.assert_allclose(found, [[-1.25, 3.75], [-0.025, 7.5]], rtol=1e-6)   # leaky ReLU of 2 x [-1, 3]


def test_int8_stacks_stay_close_to_float32():
    from valdocmb.core.openvino_runtime import compile_stack, input_ranges

    net = randomised(ScreeningFCN(), seed=11)
    volume = torch.from_numpy(np.random.default_rng(12).normal(size=(3, 1, 24, 40, 40)).astype(np.float32))
    ranges = input_ranges(list(net.features), [volume])
    with torch.inference_mode():
        pooled = net.local_features(volume)
        exact = torch.softmax(net.head(pooled), 1)[:, 1]
    local = compile_stack(list(net.features[:3]), 1, "float32", 2, int8=[None, ranges[1]])(volume)
    scores = torch.softmax(compile_stack(list(net.features[3:]), 64, "float32", 2,
                                         int8=[ranges[2], ranges[3], None, None])(pooled), 1)[:, 1]
    assert (local - pooled).abs().max() < 0.05 * pooled.abs().max()
    assert (scores - exact).abs().max() < 0.05



def test_int8_quantizes_c2_only_the_layers_after_pooling_stay_floating_point(monkeypatch):
    """With int8, screening's head and discrimination's layers after the pooling compute what the floating-point
    pipeline computes from the same C2 output; only C1-C2 (C2 quantized) differ."""
    from valdocmb.core.openvino_runtime import input_ranges

    screening, discrimination = randomised(ScreeningFCN(), seed=13), randomised(DiscriminationCNN(), seed=14)
    volume = torch.from_numpy(np.random.default_rng(15).normal(size=(2, 1, 22, 26, 26)).astype(np.float32))
    ranges = {"screening": input_ranges(list(screening.features), [volume]),
              "discrimination": input_ranges(list(discrimination.features), [volume])}
    monkeypatch.setattr(three_stage, "cpu_has_bfloat16", lambda: False)    # int8 leaves float32 then
    pipelines = {}
    for precision in ("int8", "float32"):
        config = ThreeStageConfig(precision=precision, runtime="openvino")
        pipelines[precision] = ThreeStagePipeline(screening, discrimination, SegmentationUNet(), "cpu", config, ranges)
    quantized, exact = pipelines["int8"], pipelines["float32"]
    pooled = exact.run_piece("screening_local", volume)
    assert (quantized.run_piece("screening_local", volume) - pooled).abs().max() > 0       # C2 is quantized
    np.testing.assert_allclose(quantized.run_piece("screening_head", pooled), exact.run_piece("screening_head", pooled),
                               atol=1e-5)

def test_int8_needs_a_calibration_made_for_these_weights(tmp_path):
    from valdocmb.bench import int8

    weights, scans = tmp_path / "weights", tmp_path / "scans"
    save_fixed_weights(weights)
    with pytest.raises(CaseError, match="no int8 calibration"):
        ThreeStagePipeline.from_weights(weights, "cpu", precision="int8", runtime="auto")
    scans.mkdir()
    sitk.WriteImage(dark_blob_scan(), str(scans / "sub-301_space-T2S_desc-masked_T2S.nii.gz"))
    assert int8.main(["--weights", str(weights), "--data", str(scans), "--crops", "2"]) == 0
    entry = json.loads((weights / "MANIFEST.json").read_text())[three_stage.INT8_KEY]
    assert set(entry["ranges"]) == {"screening", "discrimination"} and len(entry["ranges"]["screening"]) == 6
    pipeline = ThreeStagePipeline.from_weights(weights, "cpu", precision="int8", runtime="auto")
    assert pipeline.config.runtime == "openvino" and pipeline.describe()["config"]["precision"] == "int8"
    exact = fixed_pipeline().segment(dark_blob_scan(), {})
    assert np.array_equal(sitk.GetArrayFromImage(pipeline.segment(dark_blob_scan(), {}).mask),
                          sitk.GetArrayFromImage(exact.mask))
    with pytest.raises(CaseError, match="runs on OpenVINO"):
        ThreeStagePipeline.from_weights(weights, "cpu", precision="int8", runtime="torch")
    save_weights(dark_spot_screening(), weights / WEIGHT_FILES["screening"], {"changed": True})  # new weights
    with pytest.raises(CaseError, match="no int8 calibration"):
        ThreeStagePipeline.from_weights(weights, "cpu", precision="int8", runtime="auto")


def test_a_recorded_candidate_budget_caps_candidates_for_these_weights_only(tmp_path):
    from valdocmb.bench import weights_eval

    weights = tmp_path / "weights"
    save_fixed_weights(weights)
    assert ThreeStagePipeline.from_weights(weights, "cpu").config.max_candidates == 2000
    rows = [{"budget": k, "cases": 1, "microbleeds": 1, "held": 1, "candidates_per_scan": 1.0, "scans_capped": 0}
            for k in (250, 2000)]
    budgets = {f"new_{held}": rows for held in ("holdout", "ood", "tuning")}
    budget = weights_eval.decide_budget(budgets, "new")
    weights_eval.record_budget(weights, budget, budgets, "new")
    assert ThreeStagePipeline.from_weights(weights, "cpu").config.max_candidates == 250
    assert ThreeStagePipeline.from_weights(weights, "cpu", config=ThreeStageConfig()).config.max_candidates == 2000
    save_weights(dark_spot_screening(), weights / WEIGHT_FILES["screening"], {"changed": True})  # new weights
    assert ThreeStagePipeline.from_weights(weights, "cpu").config.max_candidates == 2000


def test_openvino_unet_computes_what_torch_computes():
    net = randomised(SegmentationUNet(), seed=13)
    volume = np.random.default_rng(14).normal(size=(31, 40, 37)).astype(np.float32)
    centres = np.array([(0, 0, 0), (30, 39, 36), (15, 20, 18)])
    maps = [ThreeStagePipeline(ScreeningFCN(), DiscriminationCNN(), net, "cpu", ThreeStageConfig(runtime=runtime))
            .segment_candidates(volume, centres) for runtime in ("torch", "openvino")]
    np.testing.assert_allclose(maps[1], maps[0], atol=1e-5)


def test_screening_skip_measurement_keeps_every_position_above_threshold(tmp_path):
    """The darkness tests' thresholds are the loosest that keep every position at or above the screening threshold,
    so they can never keep fewer blocks than a perfect pre-test."""
    from valdocmb.bench.screening_skip import measure

    path = tmp_path / "blob_T2S.nii.gz"
    sitk.WriteImage(dark_blob_scan(), str(path))
    row = measure(fixed_pipeline(), path)
    assert row["above_threshold"] >= 1 and 0 < row["oracle_block_share"] <= 1
    for test in row["darkness"]:
        assert row["oracle_block_share"] <= test["block_share"] <= 1
        assert sum(band["above"] for band in test["by_edge_distance"].values()) == row["above_threshold"]
