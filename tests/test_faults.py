"""The runner under hostile input, faulty output locations, full disks, kills and bad settings (issue 17).

Each test names the class of fault and what happened before: a traceback, a silently wrong result or a lost case.
"""

import errno
import json
import os
import signal

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from valdocmb.core import device, imageio, run
from valdocmb.core.errors import CaseError
from valdocmb.core.weights import load_weights, save_weights
from valdocmb.models.screening import ScreeningFCN

from conftest import DarkSpotSegmenter, brain_like, make_image

SCAN = "sub-101_space-T2S_desc-masked_T2S.nii.gz"


class Recorder(DarkSpotSegmenter):
    """The stand-in segmenter, counting its calls and optionally doing something during one of them."""

    def __init__(self, during=None):
        super().__init__()
        self.calls, self.during = 0, during or {}

    def segment(self, image, timings):
        self.calls += 1
        if self.calls in self.during:
            self.during[self.calls]()
        return super().segment(image, timings)


def scan(seed=0):
    return make_image(brain_like((17, 40, 36), seed=seed, dark_spots=((8, 20, 18),)), (0.49, 0.49, 0.8))


def folder_of(tmp_path, names, layout_name="input"):
    inp = tmp_path / layout_name
    inp.mkdir()
    for i, name in enumerate(names):
        sitk.WriteImage(scan(i), str(inp / name))
    return inp


def run_main(inp, out, method, *extra):
    return run.main(["--input", str(inp), "--output", str(out), *extra], method=method)


# -- 1. full disk ----------------------------------------------------------------------------------------------

def test_a_silently_failing_image_writer_fails_the_case_and_leaves_no_mask(tmp_path, monkeypatch):
    # was: SimpleITK returned without error on a full disk, a 0-byte mask was renamed into place, "written"
    inp = folder_of(tmp_path, [SCAN])
    monkeypatch.setattr(imageio.sitk, "WriteImage", lambda image, path, *a: open(path, "wb").close())
    out = tmp_path / "out"
    assert run_main(inp, out, Recorder()) == 1
    assert not (out / "images" / "sub-101_space-T2S_prediction.nii.gz").exists()
    results = json.loads((out / "results.json").read_text())
    assert results[0]["outputs"] == [] and "could not be written" in results[0]["error_messages"][0]
    assert not list(out.rglob(".tmp-*"))


def test_a_full_disk_at_the_end_is_an_error_naming_the_file_not_a_traceback(tmp_path, monkeypatch, capfd):
    # was: results.json failed with a traceback and was missing
    inp = folder_of(tmp_path, [SCAN])

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio.os, "fsync", no_space)
    assert run_main(inp, tmp_path / "out", Recorder()) == 1
    err = capfd.readouterr().err
    assert "results.json: could not be written: No space left on device" in err and "Traceback" not in err


# -- 6. output location checked before any inference --------------------------------------------------------

@pytest.mark.parametrize("fault,message", [
    ("output is a file", "is a file, not an output folder"),
    ("output's parent is a file", "the output folder is not writable"),
    ("qc is a file", "exists as a file where the run writes a folder"),
    ("socket path leaves the output", "leads outside the output folder"),
])
def test_an_unusable_output_stops_the_run_before_inference(tmp_path, capfd, fault, message):
    # was: inference ran on every case, then each case failed blaming its input, and a traceback ended the run
    inp = folder_of(tmp_path, ["a.nii.gz", "b.nii.gz"])
    out, extra = tmp_path / "out", ["--reports", "on"]
    if fault == "output is a file":
        out.write_text("not a folder")
    elif fault == "output's parent is a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif fault == "qc is a file":
        out.mkdir()
        (out / "qc").write_text("")
    else:
        extra += ["--layout", "gc", "--output-socket-path", "../x"]
        (inp / "inputs.json").write_text(json.dumps([{"interface": {"slug": "t2s", "kind": "Image",
                                                                    "relative_path": "images/t2s"}}]))
        (inp / "images" / "t2s").mkdir(parents=True)
        sitk.WriteImage(scan(), str(inp / "images" / "t2s" / "x.mha"))
    method = Recorder()
    assert run_main(inp, out, method, *extra) == 2
    assert method.calls == 0 and message in capfd.readouterr().err


def test_an_output_name_too_long_fails_that_case_before_inference(tmp_path):
    inp = folder_of(tmp_path, ["a" * 240 + ".nii.gz", "short.nii.gz"])
    method = Recorder()
    assert run_main(inp, tmp_path / "out", method) == 1
    assert method.calls == 1 and (tmp_path / "out" / "short_CMB.nii.gz").is_file()


# -- 7. stale results, temporary files, kills ---------------------------------------------------------------

def test_a_rerun_leaves_no_earlier_mask_beside_a_failed_case_and_removes_old_temporaries(tmp_path):
    inp = folder_of(tmp_path, [SCAN])
    out = tmp_path / "out"
    assert run_main(inp, out, Recorder()) == 0
    mask = out / "images" / "sub-101_space-T2S_prediction.nii.gz"
    assert mask.is_file()
    (out / "images" / ".tmp-0123456789abcdef0123456789abcdef.nii.gz").write_bytes(b"left by a killed run")

    def fail():
        raise CaseError("this time the case fails")

    assert run_main(inp, out, Recorder(during={1: fail})) == 1
    assert not mask.exists()       # was: the earlier mask stayed beside a results.json saying "failed"
    messages = json.loads((out / "results.json").read_text())[0]["error_messages"]
    assert messages == [f"{inp / SCAN}: this time the case fails"]
    assert not list(out.rglob(".tmp-*"))


def test_sigterm_during_a_case_records_what_was_done(tmp_path):
    # was: SIGTERM left no record of the cases already finished
    inp = folder_of(tmp_path, [f"sub-10{i}_space-T2S_desc-masked_T2S.nii.gz" for i in (1, 2, 3)])
    out = tmp_path / "out"
    method = Recorder(during={2: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    assert run_main(inp, out, method) == 143
    results = json.loads((out / "results.json").read_text())
    assert results[0]["outputs"] and not results[0]["error_messages"]
    assert "interrupted (SIGTERM)" in results[1]["error_messages"][0]
    assert "not run: the run was stopped (SIGTERM)" in results[2]["error_messages"][0]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["sub-101_space-T2S_prediction.nii.gz"]
    assert json.loads((out / "run.json").read_text())["stopped"] == "SIGTERM"


def test_sigterm_during_a_write_lets_the_write_finish(tmp_path, monkeypatch):
    real_write = sitk.WriteImage

    def write_then_get_killed(image, path, *args):
        real_write(image, path, *args)
        os.kill(os.getpid(), signal.SIGTERM)

    from valdocmb.core.stopping import Terminated, stop_on_sigterm

    monkeypatch.setattr(imageio.sitk, "WriteImage", write_then_get_killed)
    target = tmp_path / "mask.nii.gz"
    with stop_on_sigterm(), pytest.raises(Terminated):
        imageio.write_image_atomic(scan(), target)
    assert sitk.ReadImage(str(target)).GetSize() == scan().GetSize()   # complete, under its final name
    assert not list(tmp_path.glob(".tmp-*"))


# -- 3. discovery: nothing lost without a word --------------------------------------------------------------

def test_a_folder_keeps_links_folders_and_cmb_names_as_cases_and_says_what_it_ignores(tmp_path, capfd):
    inp = folder_of(tmp_path, ["good.nii.gz", "study_CMB_2019.nii.gz", "scan_CMB.nii.gz"])
    (inp / "dangling.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (inp / "folder.nii.gz").mkdir()
    (inp / "notes.txt").write_text("")
    assert run_main(inp, tmp_path / "out", Recorder()) == 1
    summary = {row.split(",")[0]: row for row in (tmp_path / "out" / "summary.csv").read_text().splitlines()[1:]}
    assert set(summary) == {"dangling", "folder", "good", "study_CMB_2019"}   # was: 1 of 1 written, exit 0
    assert "symbolic link to a missing file" in summary["dangling"] and "not a regular file" in summary["folder"]
    captured = capfd.readouterr()
    err = captured.out + captured.err
    assert "ignored" in err and "scan_CMB.nii.gz: named like a mask" in err and "notes.txt" in err


def test_one_subject_under_two_space_labels_gives_two_cases(tmp_path):
    # was: the later overwrote the earlier, and the run said 1 of 1 written
    inp = folder_of(tmp_path, ["sub-101_space-T2S_desc-masked_T2S.nii.gz", "sub-101_space-MNI_desc-masked_T2S.nii.gz"])
    out = tmp_path / "out"
    assert run_main(inp, out, Recorder()) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["sub-101_space-MNI_prediction.nii.gz",
                                                                   "sub-101_space-T2S_prediction.nii.gz"]
    assert len(json.loads((out / "results.json").read_text())) == 2


# -- 8. report collisions -----------------------------------------------------------------------------------

def test_scans_sharing_a_name_in_several_formats_get_their_own_reports(tmp_path):
    # was: scan.nii, scan.nii.gz and scan.mha wrote one lesion table and one QC picture
    inp = folder_of(tmp_path, ["scan.nii", "scan.nii.gz", "scan.mha"])
    out = tmp_path / "out"
    assert run_main(inp, out, Recorder()) == 0
    assert sorted(p.name for p in out.glob("*_lesions.csv")) == ["scan-mha_CMB_lesions.csv", "scan-nii_CMB_lesions.csv",
                                                                  "scan-niigz_CMB_lesions.csv"]
    assert len(list((out / "qc").glob("*.png"))) == 3


# -- 9. settings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variable,value", [("CMB_LESION_RULE", "weight"), ("CMB_REPORTS", "yes"),
                                            ("CMB_DEVICE", "gpu"), ("CMB_METHOD", "nnUNet"), ("CMB_PRECISION", "half")])
def test_environment_values_are_held_to_the_flags_choices(tmp_path, monkeypatch, capsys, variable, value):
    # was: the lesion rule or the reports turned off silently, or a torch traceback (gpu)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stop:
        run.main(["--input", str(tmp_path), "--output", str(tmp_path / "out")], method=Recorder())
    assert stop.value.code == 2 and f"{variable}={value!r} is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("step", ["0", "1.5", "-0.5", "half"])
def test_an_out_of_range_tile_step_is_refused_at_the_command_line(step, capsys):
    # was: every case failed with an assertion that blamed the input
    with pytest.raises(SystemExit) as stop:
        run.parse_arguments(["--nnunet-tile-step", step])
    assert stop.value.code == 2 and "--nnunet-tile-step" in capsys.readouterr().err


# -- 10. damaged weights without a manifest -------------------------------------------------------------

def test_weights_holding_infinities_are_refused_even_without_a_manifest(tmp_path):
    # was: loaded silently, so no candidates and exit 0
    net = ScreeningFCN()
    with torch.no_grad():
        net.features[0][0].weight.fill_(float("inf"))
    save_weights(net, tmp_path / "three_stage" / "screening.pt")
    with pytest.raises(CaseError, match="NaN or Inf values"):
        load_weights(ScreeningFCN(), tmp_path, "three_stage/screening.pt")


# -- 11. grand-challenge inputs.json ---------------------------------------------------------------------

def test_odd_inputs_json_entries_are_ignored_with_a_reason_not_a_traceback(tmp_path, capfd):
    inp = tmp_path / "input"
    (inp / "images" / "t2-star").mkdir(parents=True)
    sitk.WriteImage(scan(), str(inp / "images" / "t2-star" / "x.mha"))
    entries = ["not an object", {"value": 3}, {"interface": {"kind": "Image"}},
               {"interface": {"slug": "t2-star", "kind": "Image", "relative_path": "images/t2-star"}}]
    (inp / "inputs.json").write_text(json.dumps(entries))
    assert run_main(inp, tmp_path / "out", Recorder()) == 0
    captured = capfd.readouterr()
    err = captured.out + captured.err
    assert err.count("is not a socket value with an interface slug") == 3 and "images/None" not in err


def test_an_input_path_that_is_a_file_is_named_as_such(tmp_path, capfd):
    (tmp_path / "scan.nii.gz").write_text("")
    assert run_main(tmp_path / "scan.nii.gz", tmp_path / "out", Recorder()) == 2
    assert "is a file, not an input folder" in capfd.readouterr().err


# -- the fuzz test ---------------------------------------------------------------------------------------

def test_random_corruptions_end_in_a_correct_mask_or_a_clear_refusal(tmp_path):
    """Bytes and header fields of a small scan corrupted at random: every run writes a mask with the geometry of
    what was read, or refuses the case with a message naming the file; never a traceback or an 'unexpected'."""
    rng = np.random.default_rng(17)
    source = tmp_path / "source.nii"
    sitk.WriteImage(scan(), str(source))
    original = source.read_bytes()
    fields = [(40, 56), (70, 74), (76, 108), (108, 112), (252, 256), (280, 348)]   # dims, type, pixdim, offset, xforms
    outcomes = {"mask": 0, "refused": 0}
    for trial in range(40):
        data = bytearray(original)
        if trial % 2:
            start, end = fields[rng.integers(len(fields))]
            data[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
        else:
            for at in rng.integers(0, len(data), rng.integers(1, 50)):
                data[at] = rng.integers(0, 256)
        if trial % 3 == 0:
            data = data[: rng.integers(1, len(data))]
        inp, out = tmp_path / f"in{trial}", tmp_path / f"out{trial}"
        inp.mkdir()
        (inp / "scan.nii").write_bytes(bytes(data))
        code = run_main(inp, out, Recorder(), "--reports", "off")
        assert code in (0, 1), trial
        if code == 0:
            mask, read = sitk.ReadImage(str(out / "scan_CMB.nii")), imageio.read_scan(inp / "scan.nii")
            assert imageio.same_geometry(mask, read) and mask.GetPixelID() == sitk.sitkUInt8
            outcomes["mask"] += 1
        else:
            error = json.loads((out / "run.json").read_text())["cases"][0]["error"]
            assert "scan.nii" in error and "unexpected" not in error, (trial, error)
            outcomes["refused"] += 1
    assert outcomes["mask"] and outcomes["refused"]


# -- threads (issue 18) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("files,expected", [({"cpu.max": "150000 100000\n"}, 2), ({"cpu.max": "max 100000\n"}, None),
                                            ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3),
                                            ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
                                            ({}, None)])
def test_the_container_cpu_quota_is_read_from_cgroups(tmp_path, files, expected):
    from valdocmb.core.device import cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


def test_threads_option_and_its_environment_variable(monkeypatch, capsys):
    assert run.parse_arguments(["--threads", "3"]).threads == 3
    monkeypatch.setenv("CMB_THREADS", "2")
    assert run.parse_arguments([]).threads == 2
    monkeypatch.setenv("CMB_THREADS", "zero")
    with pytest.raises(SystemExit):
        run.parse_arguments([])
    assert "CMB_THREADS='zero'" in capsys.readouterr().err
    from valdocmb.core.device import cpu_threads

    before = torch.get_num_threads()
    try:
        assert cpu_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- 12. a GPU the torch build cannot use ---------------------------------------------------------------------

@pytest.mark.parametrize("text,version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n", "535.183.01"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.82.07  Release Build  (dvs-builder@U16)\n",
     "580.82.07"),
    ("garbage\n", None),
])
def test_the_nvidia_driver_version_is_read_from_proc(tmp_path, text, version):
    (tmp_path / "version").write_text(text)
    assert device.nvidia_driver(tmp_path / "version") == version
    assert device.nvidia_driver(tmp_path / "missing") is None


def test_a_driver_too_old_for_the_cuda_build_is_named_with_the_fix():
    problem = device.driver_problem("535.183.01", "13.0")
    assert "535.183.01 is older" in problem and "580.65.06 or newer" in problem and "GPU builds" in problem
    assert device.driver_problem("535.183.01", "12.8") is None      # minor-version compatibility
    assert device.driver_problem("470.256.02", "12.8") is not None
    assert device.driver_problem("580.82.07", "13.0") is None
    assert device.driver_problem(None, "13.0") is None and device.driver_problem("535.1", None) is None


def test_device_cuda_without_a_usable_gpu_names_the_driver(monkeypatch, caplog):
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device.torch.version, "cuda", "13.0")
    monkeypatch.setattr(device, "nvidia_driver", lambda: "535.183.01")
    with pytest.raises(CaseError, match="535.183.01 is older"):
        device.resolve_device("cuda")
    assert device.resolve_device("auto").type == "cpu"
    assert "running on CPU: the NVIDIA driver 535.183.01 is older" in caplog.text


# -- 13. failures as grand-challenge shows them -----------------------------------------------------------------

def test_process_py_on_a_corrupt_scan_ends_stderr_with_the_file_and_the_reason(tmp_path):
    # grand-challenge shows a failed job's last stderr line as its error; it was "done: 0 of 1 case(s) written,
    # 1 failed", with the cause two lines above
    import subprocess
    import sys
    from pathlib import Path

    inp = tmp_path / "input"
    inp.mkdir()
    (inp / "scan.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "process.py"), "--input", str(inp), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "scan.nii.gz" in last and "cannot be read" in last and "done:" not in last
    assert "done: 0 of 1 case(s) written, 1 failed" in done.stdout and "INFO" not in done.stderr


def test_the_weights_lookup_says_what_is_wrong(tmp_path, caplog):
    from pathlib import Path

    from valdocmb.core.weights import default_weights_dir, resolve_weights_dir

    a_file = tmp_path / "screening.pt"
    a_file.write_bytes(b"")
    with pytest.raises(CaseError, match="is a file; give the folder that holds three_stage/"):
        resolve_weights_dir(a_file)
    with pytest.raises(CaseError, match="no such folder"):
        resolve_weights_dir(tmp_path / "missing")
    # a model tarball packed with its folder: /opt/ml/model/weights/three_stage/... is used, and the log says so
    unpacked = tmp_path / "model"
    unpacked.mkdir()
    (unpacked / "weights").symlink_to(Path(default_weights_dir()).resolve(), target_is_directory=True)
    assert resolve_weights_dir(unpacked) == unpacked / "weights"
    assert "packed one level too deep" in caplog.text
    # a weights folder is used as it is
    assert resolve_weights_dir(default_weights_dir()) == default_weights_dir()


def test_a_run_on_weights_packed_one_level_too_deep_segments_with_them(tmp_path, capfd):
    from pathlib import Path

    from valdocmb.core.weights import default_weights_dir

    unpacked = tmp_path / "model"
    unpacked.mkdir()
    (unpacked / "weights").symlink_to(Path(default_weights_dir()).resolve(), target_is_directory=True)
    inp = folder_of(tmp_path, [SCAN])
    assert run.main(["--input", str(inp), "--output", str(tmp_path / "out"), "--weights", str(unpacked),
                     "--location", "off", "--reports", "off"]) == 0
    assert "packed one level too deep" in capfd.readouterr().err


def test_checkpoints_and_pickles_go_through_the_one_write_path(tmp_path):
    """A save that fails half-way leaves neither a partial file under the final name nor a temporary one (was: a
    killed save left `*.ckpt.tmp`); what a SIGKILL leaves is removed when training starts again."""
    import torch

    from valdocmb.core.errors import CaseError
    from valdocmb.core.imageio import remove_temporary_files, write_pickle_atomic
    from valdocmb.core.weights import torch_save_atomic

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("stopped half-way")

    path = tmp_path / "screening.ckpt"
    torch_save_atomic({"step": 1}, path)
    with pytest.raises((CaseError, RuntimeError)):
        torch_save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["screening.ckpt"]
    write_pickle_atomic([1, 2], tmp_path / "regions.pkl")
    (tmp_path / ".tmp-0123-screening.ckpt").write_bytes(b"left by SIGKILL")
    assert remove_temporary_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regions.pkl", "screening.ckpt"]
