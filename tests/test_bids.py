"""BIDS in, BIDS derivatives out, called as a BIDS App; the official validator's verdict on both."""

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.core import run
from valdocmb.core.imageio import same_geometry
from valdocmb.core.layouts import detect_layout

from conftest import DarkSpotSegmenter, brain_like, make_image

VALIDATOR = shutil.which("bids-validator-deno")


def scan(seed=0, spacing=(1.0, 1.0, 3.0)):
    return make_image(brain_like((17, 40, 36), seed=seed, dark_spots=((8, 20, 18),)), spacing, (10.0, -20.0, 5.0))


def write(image, path, sidecar=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))


def dataset(root, subjects=("01",), extra=True):
    """A raw BIDS dataset: T2starw per subject; with `extra`, a second session, a multi-echo MEGRE subject (echo 3's
    EchoTime inherited from a top-level sidecar), a phase part and a T1w."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "test", "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "CC0", "Authors": ["A", "B"]}))
    (root / "README").write_text("A small dataset made by the tests to check the BIDS layout end to end.\n" * 3)
    for number, subject in enumerate(subjects):
        write(scan(number), root / f"sub-{subject}" / "anat" / f"sub-{subject}_T2starw.nii.gz",
              {"EchoTime": 0.02, "MagneticFieldStrength": 3})
    if extra:
        anat = root / "sub-01" / "anat"
        shutil.rmtree(anat)
        for session in ("1", "2"):
            write(scan(7), root / "sub-01" / f"ses-{session}" / "anat" / f"sub-01_ses-{session}_T2starw.nii.gz",
                  {"EchoTime": 0.02})
        anat = root / "sub-mega" / "anat"
        for echo, echo_time in ((1, 0.006), (2, 0.018), (3, 0.032)):
            name = f"sub-mega_echo-{echo}_part-mag_MEGRE.nii.gz"
            write(scan(echo, spacing=(0.9, 0.9, 2.0)), anat / name, {"EchoTime": echo_time} if echo < 3 else None)
            write(scan(echo), anat / name.replace("part-mag", "part-phase"), {"EchoTime": echo_time, "Units": "rad"})
        (root / "echo-3_part-mag_MEGRE.json").write_text(json.dumps({"EchoTime": 0.032}))
        write(scan(9), anat / "sub-mega_T1w.nii.gz", {})
    return root


def validator_errors(folder):
    result = subprocess.run([VALIDATOR, str(folder), "--format", "json"], capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    return [(issue["code"], issue.get("location")) for issue in report["issues"]["issues"]
            if issue["severity"] == "error"]


def app(bids, out, *extra, level="participant"):
    return run.main([str(bids), str(out), level, *extra], method=DarkSpotSegmenter())


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_bids_app_call_writes_valid_derivatives(tmp_path):
    bids = dataset(tmp_path / "bids")
    out = bids / "derivatives" / "valdocmb"
    assert detect_layout(bids) == "bids"
    assert app(bids, out) == 0

    # one mask per T2*-weighted scan, in its geometry; the MEGRE scan read at the echo nearest 20 ms (18 ms)
    for source, mask in (("sub-01/ses-1/anat/sub-01_ses-1_T2starw.nii.gz", "sub-01/ses-1/anat/sub-01_ses-1"),
                         ("sub-01/ses-2/anat/sub-01_ses-2_T2starw.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2"),
                         ("sub-mega/anat/sub-mega_echo-2_part-mag_MEGRE.nii.gz", "sub-mega/anat/sub-mega")):
        written = sitk.ReadImage(str(out / f"{mask}_desc-cmb_mask.nii.gz"))
        assert same_geometry(written, sitk.ReadImage(str(bids / source)))
        assert sitk.GetArrayFromImage(written)[8, 20, 18] == 1
        sidecar = json.loads((out / f"{mask}_desc-cmb_mask.json").read_text())
        assert sidecar["Sources"] == [f"bids:raw:{source}"] and sidecar["Type"] == "Lesion"
        assert sidecar["CMBCount"] == 1 and sidecar["GeneratedBy"]["Method"] == "dark-spot stand-in"
        lesions = read_tsv(out / f"{mask}_desc-cmb_lesions.tsv")
        assert len(lesions) == 1 and float(lesions[0]["volume_mm3"]) > 0
        assert set(json.loads((out / f"{mask}_desc-cmb_lesions.json").read_text())) == set(lesions[0])
        assert (out / f"{mask}_desc-cmb_regions.tsv").is_file()
    assert json.loads((out / "sub-mega/anat/sub-mega_desc-cmb_mask.json").read_text())["SourceEchoTime"] == 0.018
    assert len(list(out.rglob("*_mask.nii.gz"))) == 3  # no phase part, no T1w, no other echo

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "valdocmb"
    scans = read_tsv(out / "cmb_scans.tsv")
    assert [(row["participant_id"], row["session_id"], row["status"], row["cmb_count"]) for row in scans] == [
        ("sub-01", "ses-1", "ok", "1"), ("sub-01", "ses-2", "ok", "1"), ("sub-mega", "n/a", "ok", "1")]
    assert scans[2]["echo_time_ms"] == "18.0"
    record = json.loads((out / "run.json").read_text())
    assert record["cases"][2]["input"]["echo_time_ms"] == 18.0

    if VALIDATOR is None:
        pytest.skip("bids-validator-deno is not installed (pip install '.[test]')")
    assert validator_errors(bids) == []
    assert validator_errors(out) == []


def test_participant_and_session_labels_and_missing_ones(tmp_path, capfd):
    bids = dataset(tmp_path / "bids")
    out = tmp_path / "derivatives"
    assert app(bids, out, "--participant-label", "sub-01", "--session-label", "2", "--location", "off") == 0
    assert [p.name for p in out.rglob("*_mask.nii.gz")] == ["sub-01_ses-2_desc-cmb_mask.nii.gz"]
    assert not list(out.rglob("*_regions.tsv"))  # --location off: no regional counts
    assert app(bids, out, "--participant-label", "01", "99") == 2
    assert "no scan of participant(s) 99" in capfd.readouterr().err


def test_phase_t2star_map_and_swi_names(tmp_path):
    bids = dataset(tmp_path / "bids", subjects=("a",), extra=False)
    anat = bids / "sub-a" / "anat"
    write(scan(3), anat / "sub-a_part-mag_swi.nii.gz")
    write(scan(3), anat / "sub-a_part-phase_swi.nii.gz")
    write(scan(3), anat / "sub-a_T2star.nii.gz")
    out = tmp_path / "out"
    assert app(bids, out, "--location", "off") == 0
    # T2starw and swi of one subject: both processed, told apart by desc
    assert sorted(p.name for p in out.rglob("*_mask.nii.gz")) == [
        "sub-a_desc-cmbT2starw_mask.nii.gz", "sub-a_desc-cmbswi_mask.nii.gz"]
    ignored = {entry["path"].split("/")[-1]: entry["reason"] for entry in json.loads((out / "run.json").read_text())
               ["ignored"]}
    assert "not a magnitude image" in ignored["sub-a_part-phase_swi.nii.gz"]
    assert "quantitative T2* map" in ignored["sub-a_T2star.nii.gz"]


def test_twenty_subjects_in_two_shards_make_one_derivatives_folder(tmp_path):
    subjects = [f"{n:02d}" for n in range(1, 21)]
    bids = dataset(tmp_path / "bids", subjects=subjects, extra=False)
    out = tmp_path / "derivatives"
    assert app(bids, out, "--shard", "1/2", "--location", "off") == 0
    assert len(read_tsv(out / "cmb_scans.tsv")) == 10
    assert app(bids, out, "--shard", "2/2", "--location", "off") == 0
    scans = read_tsv(out / "cmb_scans.tsv")
    assert [row["participant_id"] for row in scans] == [f"sub-{s}" for s in subjects]
    assert {row["status"] for row in scans} == {"ok"}
    assert (out / "run.shard-1-of-2.json").is_file() and (out / "run.shard-2-of-2.json").is_file()
    # the group level rebuilds the table from what is there; --resume skips every scan
    (out / "cmb_scans.tsv").unlink()
    assert app(bids, out, level="group") == 0
    assert len(read_tsv(out / "cmb_scans.tsv")) == 20
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*_mask.nii.gz")}
    assert app(bids, out, "--resume", "--location", "off") == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_mask.nii.gz")} == before
    if VALIDATOR is not None:
        assert validator_errors(out) == []


def test_a_broken_scan_fails_alone_and_is_listed(tmp_path):
    bids = dataset(tmp_path / "bids", subjects=("01", "02"), extra=False)
    (bids / "sub-02" / "anat" / "sub-02_T2starw.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    assert app(bids, out, "--location", "off") == 1
    scans = read_tsv(out / "cmb_scans.tsv")
    assert [(row["participant_id"], row["status"]) for row in scans] == [("sub-01", "ok"), ("sub-02", "failed")]
    assert not list(out.rglob("sub-02*_mask.nii.gz"))


def test_bids_app_call_needs_all_three_and_a_separate_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.parse_arguments([str(tmp_path), str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        run.parse_arguments([str(tmp_path), str(tmp_path / "out"), "participant", "--layout", "folder"])
    bids = dataset(tmp_path / "bids", extra=False)
    assert app(bids, bids) == 2
    assert np.isfinite(run.parse_arguments([str(bids), "o", "participant", "--echo-time", "25"]).echo_time)
