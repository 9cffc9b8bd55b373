"""DICOM series in: series chosen by their tags, geometry kept, incomplete or corrupt series failed by name, and the
same masks as from the series' NIfTI conversion."""

import json
import locale

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.bench.layouts import write_dicom_series
from valdocmb.core import run
from valdocmb.core.dicom import t2star_reason
from valdocmb.core.imageio import same_geometry
from valdocmb.core.layouts import detect_layout

from conftest import DarkSpotSegmenter, brain_like, make_image, rotation

STUDY = "1.2.826.0.1.3680043.8.498.1"
ORIENTATIONS = {"axial": np.eye(3), "sagittal": np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]),
                "oblique": rotation(12, -8, 20)}


@pytest.fixture(autouse=True)
def keep_locale():
    """GDCM's DICOM writer sets the process locale to C (ASCII) and leaves it so (the multi-frame file below is
    written here directly); later tests that decode a subprocess's output as text would fail on non-ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def volume(direction=None, seed=0, spacing=(0.9, 0.9, 3.0)):
    array = 10 * brain_like((17, 40, 36), seed=seed, dark_spots=((8, 20, 18),))
    return make_image(array.astype(np.int16), spacing, (-60.0, 80.0, -30.0), direction)


def write_series(folder, image, number, description="swi_tra", image_type="ORIGINAL\\PRIMARY\\M\\ND",
                 echo_time="20", study=STUDY, skip=(), start=0):
    """A classic single-frame series, one file per slice, with the tags a scanner writes."""
    write_dicom_series(image, folder, {"0008|0060": "MR", "0020|000d": study, "0020|000e": f"{study}.{number}",
                                       "0008|103e": description, "0020|0011": str(number), "0018|0081": echo_time,
                                       "0008|0008": image_type, "0018|0020": "GR"}, skip=skip, start=start)


def run_dicom(inp, out, *extra):
    return run.main(["--input", str(inp), "--output", str(out), "--location", "off", *extra],
                    method=DarkSpotSegmenter())


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_a_series_gives_the_mask_of_its_nifti_conversion(tmp_path, orientation):
    image = volume(ORIENTATIONS[orientation])
    write_series(tmp_path / "export" / "DICOM" / "S5", image, 5)
    assert detect_layout(tmp_path / "export") == "dicom"
    assert run_dicom(tmp_path / "export", tmp_path / "out") == 0
    from_dicom = sitk.ReadImage(str(tmp_path / "out" / "series-005_CMB.nii.gz"))
    assert same_geometry(from_dicom, image)  # the series' geometry, whatever its orientation
    assert sitk.GetArrayFromImage(from_dicom)[8, 20, 18] == 1

    # the NIfTI a user would convert it to gives the same mask, voxel for voxel
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "export" / "DICOM" / "S5")))
    (tmp_path / "nifti").mkdir()
    sitk.WriteImage(reader.Execute(), str(tmp_path / "nifti" / "scan.nii.gz"))
    assert run_dicom(tmp_path / "nifti", tmp_path / "out-nifti") == 0
    from_nifti = sitk.ReadImage(str(tmp_path / "out-nifti" / "scan_CMB.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(from_nifti))
    assert same_geometry(from_dicom, from_nifti)


def test_mixed_folder_takes_magnitude_t2star_series_only(tmp_path):
    inp = tmp_path / "in"
    image = volume()
    write_series(inp / "a", image, 5)                                               # SWI magnitude: taken
    write_series(inp / "a", image, 6, image_type="ORIGINAL\\PRIMARY\\P\\ND", start=100)  # its phase: ignored
    write_series(inp / "b", image, 2, description="t1_mprage_sag", echo_time="2.3")  # T1: ignored
    write_series(inp / "b", image, 9, description="swi_mIP", image_type="DERIVED\\PRIMARY\\MNIP", start=100)
    for echo, echo_time in enumerate(("10", "18", "30")):  # a multi-echo GRE: the echo nearest 20 ms is read
        write_series(inp / "c", volume(seed=echo), 11, description="gre_me", echo_time=echo_time, start=100 * echo)
    multi = sitk.Cast(volume(), sitk.sitkUInt16)  # a multi-frame file holds a whole series
    for key, value in {"0008|0060": "MR", "0020|000d": STUDY, "0020|000e": f"{STUDY}.12", "0020|0011": "12",
                       "0008|103e": "t2star_3d", "0018|0081": "25", "0008|0008": "ORIGINAL\\PRIMARY\\M"}.items():
        multi.SetMetaData(key, value)
    (inp / "d").mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(inp / "d" / "multiframe.dcm"))
    writer.Execute(multi)
    (inp / "d" / "notes.txt").write_text("not DICOM")

    assert run_dicom(inp, tmp_path / "out") == 0
    masks = sorted(p.name for p in (tmp_path / "out").glob("*_CMB.nii.gz"))
    assert masks == ["series-005_CMB.nii.gz", "series-011_CMB.nii.gz", "series-012_CMB.nii.gz"]
    assert same_geometry(sitk.ReadImage(str(tmp_path / "out" / "series-012_CMB.nii.gz")), multi)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    reasons = " | ".join(entry["reason"] for entry in record["ignored"])
    assert "series 6 (swi_tra): a phase image" in reasons and "series 2 (t1_mprage_sag)" in reasons
    assert "series 9 (swi_mIP): a projection" in reasons and "the 18 ms echo is read" in reasons
    echo_case = next(case for case in record["cases"] if case["case"] == "series-011")
    assert echo_case["input"]["echo_time_ms"] == 18.0 and echo_case["input"]["files"] == 17
    summary = (tmp_path / "out" / "summary.csv").read_text()  # reports are on by default, as for a folder
    assert "series-005" in summary and "PatientName" not in summary


def test_missing_slice_and_corrupt_file_fail_their_series_only(tmp_path, capfd):
    inp = tmp_path / "in"
    write_series(inp / "good", volume(), 3)
    write_series(inp / "gap", volume(), 4, skip=(7,))
    write_series(inp / "bad", volume(), 7)
    victim = inp / "bad" / "IM0005"
    victim.write_bytes(victim.read_bytes()[:-3000])  # pixel data cut short

    assert run_dicom(inp, tmp_path / "out") == 1
    assert (tmp_path / "out" / "series-003_CMB.nii.gz").is_file()
    assert not (tmp_path / "out" / "series-004_CMB.nii.gz").exists()
    assert not (tmp_path / "out" / "series-007_CMB.nii.gz").exists()
    err = capfd.readouterr().err
    assert "gap (series 4 (swi_tra)): incomplete series" in err and "1 missing slice" in err
    assert "bad (series 7 (swi_tra))" in err


def test_two_studies_get_their_own_names_and_no_series_is_a_clear_error(tmp_path, capfd):
    inp = tmp_path / "in"
    write_series(inp / "p1", volume(), 5, study="1.2.3.1")
    write_series(inp / "p2", volume(), 5, study="1.2.3.2")
    assert run_dicom(inp, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*_CMB.nii.gz")) == [
        "study-1_series-005_CMB.nii.gz", "study-2_series-005_CMB.nii.gz"]

    only_t1 = tmp_path / "t1"
    write_series(only_t1, volume(), 2, description="t1_mprage", echo_time="2.3")
    assert run_dicom(only_t1, tmp_path / "out2", "--layout", "dicom") == 2
    assert "no magnitude T2*-weighted or SWI series" in capfd.readouterr().err


def test_t2star_rule_on_tags():
    assert t2star_reason({"modality": "MR", "description": "SWI_Images", "image_type": "ORIGINAL\\PRIMARY\\M"},
                         20.0) is None
    assert t2star_reason({"modality": "MR", "description": "ep2d", "sequence": "GR"}, 25.0) is None  # by physics
    assert "phase" in t2star_reason({"modality": "MR", "image_type": "ORIGINAL\\PRIMARY\\P\\ND"}, 20.0)
    assert "too short" in t2star_reason({"modality": "MR", "description": "gre_field_mapping"}, 4.9)
    assert "not MR" in t2star_reason({"modality": "CT"}, None)
    assert "not recognisably" in t2star_reason({"modality": "MR", "description": "se_t2", "sequence": "SE"}, 90.0)
