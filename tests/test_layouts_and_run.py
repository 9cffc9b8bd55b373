"""Each input layout end to end through the runner (with a stand-in segmenter): names, geometry, results.json."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.core import run
from valdocmb.core.imageio import same_geometry
from valdocmb.core.layouts import detect_layout

from conftest import DarkSpotSegmenter, brain_like, make_image, rotation

GEOMETRIES = {
    "sub-101": ((0.449, 0.449, 4.0), (1.0, 2.0, 3.0), None),
    "sub-201": ((0.488, 0.488, 0.8), (-90.0, 120.0, -70.0), rotation(0, 8, 0)),
    "sub-301": ((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0])),
}


def scan_for(sid, seed=0):
    spacing, origin, direction = GEOMETRIES[sid]
    array = brain_like((17, 40, 36), seed=seed, dark_spots=((8, 20, 18),))
    return make_image(array, spacing, origin, direction)


def run_main(input_dir, output_dir, *extra):
    return run.main(["--input", str(input_dir), "--output", str(output_dir), *extra], method=DarkSpotSegmenter())


def check_mask(mask_path, scan):
    mask = sitk.ReadImage(str(mask_path))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert same_geometry(mask, scan)
    values = sitk.GetArrayFromImage(mask)
    assert set(np.unique(values)) <= {0, 1}
    # The dark spot is found where it was put, through preprocessing and its inverse.
    assert values[8, 20, 18] == 1 and values.sum() < 200


def test_valdo2021_layout(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    scans = {}
    for sid in GEOMETRIES:
        scans[sid] = scan_for(sid)
        sitk.WriteImage(scans[sid], str(inp / f"{sid}_space-T2S_desc-masked_T2S.nii.gz"))
    sitk.WriteImage(scans["sub-101"], str(inp / "sub-101_space-T2S_desc-masked_T1.nii.gz"))
    sitk.WriteImage(scans["sub-101"], str(inp / "sub-101_space-T2S_CMB.nii.gz"))  # a label: ignored
    assert detect_layout(inp) == "valdo2021"

    assert run_main(inp, out) == 0
    for sid, scan in scans.items():
        check_mask(out / "images" / f"{sid}_space-T2S_prediction.nii.gz", scan)
    results = json.loads((out / "results.json").read_text())
    assert results[0] == {
        "outputs": [{"type": "metaio_image", "filename": ["sub-101_space-T2S_prediction.nii.gz"]}],
        "inputs": [{"type": "metaio_image", "filename": ["sub-101_space-T2S_desc-masked_T2S.nii.gz",
                                                         "sub-101_space-T2S_desc-masked_T1.nii.gz"]}],
        "error_messages": [],
    }
    assert [r["outputs"][0]["filename"][0] for r in results] == [
        f"{sid}_space-T2S_prediction.nii.gz" for sid in GEOMETRIES]
    assert sorted(p.name for p in out.iterdir()) == ["images", "results.json", "run.json"]  # no reports by default


def test_valdo2021_bad_cases_do_not_stop_the_batch(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    sitk.WriteImage(scan_for("sub-101"), str(inp / "sub-101_space-T2S_desc-masked_T2S.nii.gz"))
    (inp / "sub-102_space-T2S_desc-masked_T2S.nii.gz").write_bytes(b"garbage")           # corrupt
    sitk.WriteImage(make_image(np.zeros((5, 5, 5), np.float32)),
                    str(inp / "sub-103_space-T2S_desc-masked_T2S.nii.gz"))                 # all zero
    sitk.WriteImage(scan_for("sub-101"), str(inp / "sub-104_space-T2S_desc-masked_FLAIR.nii.gz"))  # not T2*
    sitk.WriteImage(scan_for("sub-101"), str(inp / "sub-105_space-T2S_desc-masked_T2.nii.gz"))     # no T2*

    assert run_main(inp, out) == 1
    assert (out / "images" / "sub-101_space-T2S_prediction.nii.gz").exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["sub-101_space-T2S_prediction.nii.gz"]
    results = json.loads((out / "results.json").read_text())
    errors = {r["inputs"][0]["filename"][0]: r["error_messages"] for r in results}
    assert errors["sub-101_space-T2S_desc-masked_T2S.nii.gz"] == []
    assert "sub-102_space-T2S_desc-masked_T2S.nii.gz: cannot be read" in errors[
        "sub-102_space-T2S_desc-masked_T2S.nii.gz"][0]
    assert "no non-zero finite voxel" in errors["sub-103_space-T2S_desc-masked_T2S.nii.gz"][0]
    assert "sub-104_space-T2S_desc-masked_FLAIR.nii.gz: not a VALDO T2* file name" in errors[
        "sub-104_space-T2S_desc-masked_FLAIR.nii.gz"][0]
    assert "sub-105 has sub-105_space-T2S_desc-masked_T2.nii.gz but no T2* scan" in errors[
        "sub-105_space-T2S_desc-masked_T2.nii.gz"][0]
    failed = [r for r in results if r["error_messages"]]
    assert all(r["outputs"] == [] for r in failed) and len(failed) == 4


def gc_input(inp, sockets):
    entries = []
    for slug, image in sockets.items():
        folder = inp / "images" / slug
        folder.mkdir(parents=True)
        if image is not None:
            sitk.WriteImage(image, str(folder / "5f9c2a1e-0d3b-4c55-9e7a-1b2c3d4e5f60.mha"))
        entries.append({"interface": {"slug": slug, "kind": "Image", "relative_path": f"images/{slug}",
                                      "super_kind": "Image"}, "image": {"pk": "x"}, "value": None, "file": None})
    entries.append({"interface": {"slug": "age", "kind": "Integer", "relative_path": "age.json"},
                    "value": 70, "image": None, "file": None})
    (inp / "inputs.json").write_text(json.dumps(entries))


def test_grand_challenge_sockets(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    scan = scan_for("sub-201")
    gc_input(inp, {"t1-brain-mri": scan_for("sub-301"), "t2-star-brain-mri": scan})
    assert detect_layout(inp) == "gc"
    assert run_main(inp, out) == 0
    check_mask(out / "images" / "cerebral-microbleed-segmentation" / "output.mha", scan)
    assert not (out / "results.json").exists()
    assert json.loads((out / "number-of-cerebral-microbleeds.json").read_text()) == 1
    lesions = json.loads((out / "cerebral-microbleeds.json").read_text())
    assert lesions["cmb_count"] == 1 and len(lesions["lesions"]) == 1
    # the tiny scan cannot be registered: its regional counts say so, and the mask is there all the same
    regions = json.loads((out / "cerebral-microbleed-regions.json").read_text())
    assert regions["location"].startswith("unknown: ") and regions["n_location_unknown"] == 1


def test_grand_challenge_output_path_and_socket_are_options(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    scan = scan_for("sub-101")
    gc_input(inp, {"brain-a": scan, "brain-b": scan_for("sub-301")})
    assert run_main(inp, out) == 2                    # ambiguous sockets: the run cannot start
    assert run_main(inp, out, "--input-socket", "brain-a", "--output-socket-path", "images/cmb") == 0
    check_mask(out / "images" / "cmb" / "output.mha", scan)


def test_grand_challenge_missing_image_fails(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    gc_input(inp, {"t2-star-brain-mri": None})
    assert run_main(inp, out) == 1
    assert not (out / "images").exists()


def test_plain_folder_of_mixed_formats(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    names = {"patient A.nii.gz": "sub-101", "b.nii": "sub-201", "c.mha": "sub-301", "d.nrrd": "sub-101"}
    for name, sid in names.items():
        sitk.WriteImage(scan_for(sid), str(inp / name))
    (inp / "notes.txt").write_text("not an image")
    assert detect_layout(inp) == "folder"
    assert run_main(inp, out) == 0
    expected = {"patient A_CMB.nii.gz", "b_CMB.nii", "c_CMB.mha", "d_CMB.nrrd"}
    assert {p.name for p in out.glob("*_CMB.*")} == expected
    assert {"summary.csv", "index.html", "run.json", "qc"} <= {p.name for p in out.iterdir()}
    for name, sid in names.items():
        stem = name.split(".")[0]
        ext = name[len(stem):]
        check_mask(out / f"{stem}_CMB{ext}", scan_for(sid))


def test_plain_folder_continues_past_a_broken_scan(tmp_path, capfd):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    (inp / "a_broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    sitk.WriteImage(sitk.JoinSeries([scan_for("sub-101")] * 2), str(inp / "b_4d.nii.gz"))
    sitk.WriteImage(scan_for("sub-101"), str(inp / "c_good.nii.gz"))
    assert run_main(inp, out) == 1
    assert [p.name for p in out.glob("*_CMB.nii.gz")] == ["c_good_CMB.nii.gz"]
    summary = {row["case"]: row for row in csv.DictReader(open(out / "summary.csv"))}
    assert summary["a_broken"]["status"] == "failed" and "cannot be read" in summary["a_broken"]["error"]
    assert summary["b_4d"]["status"] == "failed" and summary["c_good"]["status"] == "ok"
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert "a_broken.nii.gz: cannot be read" in log and "b_4d.nii.gz: is 4D with 2 volumes" in log
    assert "1 failed" not in log and "2 failed" in log
    # progress on stdout, errors on stderr, whose last line (what grand-challenge shows) names the first failure
    assert "done:" in captured.out and "done:" not in captured.err and "INFO" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert "2 cases failed; the first:" in last and "a_broken.nii.gz: cannot be read" in last


def test_missing_input_folder_and_empty_folder(tmp_path):
    assert run_main(tmp_path / "nope", tmp_path / "out") == 2
    (tmp_path / "empty").mkdir()
    assert run_main(tmp_path / "empty", tmp_path / "out") == 2


def test_method_loading_error_is_reported(tmp_path, monkeypatch):
    inp = tmp_path / "input"
    inp.mkdir()
    sitk.WriteImage(scan_for("sub-101"), str(inp / "a.nii.gz"))
    code = run.main(["--input", str(inp), "--output", str(tmp_path / "out"), "--weights", str(tmp_path / "none")])
    assert code == 2


def test_environment_variables_choose_defaults(monkeypatch):
    monkeypatch.setenv("CMB_METHOD", "nnunet")
    monkeypatch.setenv("CMB_DEVICE", "cpu")
    args = run.build_parser().parse_args([])
    assert (args.method, args.device, str(args.input), str(args.output)) == ("nnunet", "cpu", "/input", "/output")


def test_no_network_while_running(tmp_path):
    import socket
    import urllib.request

    import pytest

    from valdocmb.core.offline import no_network

    before = socket.socket.connect
    with no_network(), pytest.raises(OSError, match="valdocmb runs offline"):
        urllib.request.urlopen("http://127.0.0.1:9/model.pth", timeout=2)
    with no_network():
        left, right = socket.socketpair()  # local pipes (AF_UNIX) stay allowed
        left.close(), right.close()
    assert socket.socket.connect is before  # restored afterwards


def test_grand_challenge_tif_socket_is_read_and_its_lost_geometry_said(tmp_path, capfd):
    # was: layouts took the .tif as the case, then imageio refused it as an unsupported file type
    inp, out = tmp_path / "input", tmp_path / "output"
    gc_input(inp, {"t2-star-brain-mri": None})
    array = brain_like((17, 40, 36), dark_spots=((8, 20, 18),)).astype(np.int16)
    tif = inp / "images" / "t2-star-brain-mri" / "5f9c2a1e-0d3b-4c55-9e7a-1b2c3d4e5f60.tif"
    sitk.WriteImage(make_image(array, (0.49, 0.49, 1.0)), str(tif))
    assert run_main(inp, out) == 0
    check_mask(out / "images" / "cerebral-microbleed-segmentation" / "output.mha", sitk.ReadImage(str(tif)))
    assert "TIFF stores no slice spacing" in capfd.readouterr().err


def test_a_plain_folder_does_not_take_tiff_files_for_scans(tmp_path):
    inp = tmp_path / "input"
    inp.mkdir()
    sitk.WriteImage(scan_for("sub-101"), str(inp / "scan.nii.gz"))
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(inp / "screenshot.tif"))
    assert run_main(inp, tmp_path / "output") == 0
    assert sorted(p.name for p in (tmp_path / "output").glob("*_CMB.*")) == ["scan_CMB.nii.gz"]


class WrongGeometrySegmenter(DarkSpotSegmenter):
    def segment(self, image, timings):
        result = super().segment(image, timings)
        result.mask = result.mask[1:, :, :]   # a method bug: one column short
        return result


def test_a_method_returning_a_wrong_grid_fails_the_case_with_a_named_error(tmp_path, capfd):
    # was: an AssertionError, reported as "unexpected"; now a CaseError naming the scan, and nothing is written
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    sitk.WriteImage(scan_for("sub-101"), str(inp / "a.nii.gz"))
    assert run.main(["--input", str(inp), "--output", str(out)], method=WrongGeometrySegmenter()) == 1
    log = capfd.readouterr().err
    assert "a.nii.gz: the method returned a mask whose geometry differs" in log
    assert "unexpected" not in log and not (out / "a_CMB.nii.gz").exists()


def test_a_scan_too_small_for_the_processing_grid_is_a_case_error(tmp_path):
    # was: preprocess raised ValueError, which the runner reported as "unexpected"
    from valdocmb.core.errors import CaseError
    from valdocmb.core.preprocess import preprocess

    array = np.zeros((10, 10, 10), np.float32)
    array[0, 0, 0] = 5.0                       # one 0.1 mm voxel: lost on the 0.49 x 0.49 x 0.8 mm grid
    with pytest.raises(CaseError, match="no brain voxel left after resampling"):
        preprocess(make_image(array, (0.1, 0.1, 0.1)))


# -- cohorts: shards and resumed runs ------------------------------------------------------------------------

class CountingSegmenter(DarkSpotSegmenter):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def segment(self, image, timings):
        self.sizes.append(image.GetSize())
        return super().segment(image, timings)


def folder_of_scans(folder, count):
    folder.mkdir()
    for index in range(count):
        sitk.WriteImage(scan_for("sub-201", seed=index), str(folder / f"scan{index}.nii.gz"))
    return folder


def test_shards_split_a_folder_into_disjoint_parts_that_cover_it(tmp_path):
    inp, out = folder_of_scans(tmp_path / "in", 5), tmp_path / "out"
    for index in (1, 2):
        assert run_main(inp, out, "--shard", f"{index}/2") == 0
    assert sorted(p.name for p in out.glob("*_CMB.nii.gz")) == [f"scan{i}_CMB.nii.gz" for i in range(5)]
    # each shard's records name the shard, so neither overwrites the other's; no unsharded record is written
    first = list(csv.DictReader((out / "summary.shard-1-of-2.csv").open()))
    second = list(csv.DictReader((out / "summary.shard-2-of-2.csv").open()))
    assert [row["case"] for row in first] == ["scan0", "scan2", "scan4"]
    assert [row["case"] for row in second] == ["scan1", "scan3"]
    assert (out / "run.shard-2-of-2.json").is_file() and (out / "index.shard-1-of-2.html").is_file()
    assert not (out / "summary.csv").exists() and not (out / "run.json").exists()


@pytest.mark.parametrize("value", ["3/2", "0/2", "1", "a/b", "1/0"])
def test_a_shard_that_is_not_k_of_n_is_refused(value, capsys):
    with pytest.raises(SystemExit) as stop:
        run.parse_arguments(["--shard", value])
    assert stop.value.code == 2 and "--shard" in capsys.readouterr().err


def test_the_shard_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CMB_SHARD", "2/4")
    assert run.parse_arguments([]).shard == (2, 4)


def test_resume_runs_only_the_cases_whose_outputs_are_incomplete(tmp_path):
    inp, out = folder_of_scans(tmp_path / "in", 3), tmp_path / "out"
    assert run_main(inp, out) == 0
    before = {row["case"]: row for row in csv.DictReader((out / "summary.csv").open())}
    (out / "scan1_CMB.nii.gz").unlink()           # a run killed before this case's mask
    (out / "qc" / "scan2.png").unlink()           # ... or after its mask but before its QC picture
    first_mask = (out / "scan0_CMB.nii.gz").stat().st_mtime_ns

    segmenter = CountingSegmenter()
    assert run.main(["--input", str(inp), "--output", str(out), "--resume"], method=segmenter) == 0
    assert len(segmenter.sizes) == 2
    assert (out / "scan0_CMB.nii.gz").stat().st_mtime_ns == first_mask
    rows = {row["case"]: row for row in csv.DictReader((out / "summary.csv").open())}
    assert [rows[c]["status"] for c in ("scan0", "scan1", "scan2")] == ["skipped", "ok", "ok"]
    # the skipped case keeps its figures in the summary, read from its lesion table
    assert rows["scan0"]["cmb_count"] == before["scan0"]["cmb_count"] != ""
    assert rows["scan0"]["total_volume_mm3"] == before["scan0"]["total_volume_mm3"]
    record = json.loads((out / "run.json").read_text())
    assert [case["status"] for case in record["cases"]] == ["skipped", "ok", "ok"]
    assert 'qc/scan0.png' in (out / "index.html").read_text()

    # without --resume every case runs again
    segmenter = CountingSegmenter()
    assert run.main(["--input", str(inp), "--output", str(out)], method=segmenter) == 0
    assert len(segmenter.sizes) == 3


def test_resume_in_the_valdo_layout_lists_skipped_cases_as_written(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    for sid in GEOMETRIES:
        sitk.WriteImage(scan_for(sid), str(inp / f"{sid}_space-T2S_desc-masked_T2S.nii.gz"))
    assert run_main(inp, out) == 0
    segmenter = CountingSegmenter()
    assert run.main(["--input", str(inp), "--output", str(out), "--resume"], method=segmenter) == 0
    assert segmenter.sizes == []
    results = json.loads((out / "results.json").read_text())
    assert [entry["outputs"][0]["filename"] for entry in results] == [
        [f"{sid}_space-T2S_prediction.nii.gz"] for sid in sorted(GEOMETRIES)]
    assert all(entry["error_messages"] == [] for entry in results)


def test_a_new_layout_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    """A toy layout (a list file naming the scans, masks into one folder, a run-wide count) plugs in with no change
    to the runner: the class below plus its registry entry."""
    from valdocmb.core.imageio import write_text_atomic
    from valdocmb.core.layouts import REGISTRY, Case, Discovery, Layout

    class Listed(Layout):
        name = "listed"

        def discover(self, input_dir):
            names = (input_dir / "scans.txt").read_text().split()
            return Discovery(self, [Case(n.split(".")[0], input_dir / n, self.output / "masks" / n, [n])
                                    for n in names])

        def write_records(self, outcomes, run_file):
            write_text_atomic(str(sum(o.error is None for o in outcomes)), run_file("written.txt"))

    monkeypatch.setitem(REGISTRY, "listed", Listed)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    sitk.WriteImage(scan_for("sub-101"), str(inp / "a.nii.gz"))
    (inp / "scans.txt").write_text("a.nii.gz\n")
    assert run_main(inp, out, "--layout", "listed") == 0
    check_mask(out / "masks" / "a.nii.gz", scan_for("sub-101"))
    assert (out / "written.txt").read_text() == "1"


def toy_method(weights_dir, options):
    """The toy method's loader: the dark-spot stand-in, told which weights it was given."""
    method = DarkSpotSegmenter()
    original = method.segment

    def segment(image, timings):
        result = original(image, timings)
        result.info = {"method": "toy", "weights": {"version": f"toy:{weights_dir.name}"}, "device": options.device}
        return result

    method.segment = segment
    return method


def test_a_new_method_is_one_factory_and_one_registry_line(tmp_path, monkeypatch):
    """A method plugs in through the registry alone: --method accepts it and the runner loads it by name."""
    from valdocmb.core import methods

    monkeypatch.setitem(methods.REGISTRY, "toy", methods.MethodSpec("toy", toy_method, "a test method"))
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    sitk.WriteImage(scan_for("sub-101"), str(inp / "a.nii.gz"))
    weights = tmp_path / "toy-weights"
    weights.mkdir()
    assert run.main(["--input", str(inp), "--output", str(out), "--method", "toy", "--weights", str(weights),
                     "--location", "off"]) == 0
    check_mask(out / "a_CMB.nii.gz", scan_for("sub-101"))
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert summary[0]["method"] == "toy" and summary[0]["weights"] == "toy:toy-weights"
