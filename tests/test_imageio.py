import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.core.errors import CaseError
from valdocmb.core.imageio import mask_image, read_scan, same_geometry, write_image_atomic

from conftest import brain_like, make_image, rotation


def write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(CaseError, match=r"scan\.nii\.gz: file not found"):
        read_scan(tmp_path / "scan.nii.gz")


def test_empty_file(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(CaseError, match=r"scan\.nii\.gz: empty file"):
        read_scan(tmp_path / "scan.nii.gz")


def test_corrupt_file(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(CaseError, match=r"scan\.nii\.gz: cannot be read as an image"):
        read_scan(path)


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.mha", "scan.nrrd"])
def test_truncated_file(tmp_path, name):
    # ITK itself would read these and fill the missing voxels with zeros.
    sitk.WriteImage(make_image(brain_like()), str(tmp_path / name), False)
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CaseError, match=name.replace(".", r"\.") + ": (cannot be read|truncated)"):
        read_scan(path)


def test_2d_image_is_refused(tmp_path):
    path = write(sitk.GetImageFromArray(np.ones((20, 20), np.float32)), tmp_path / "slice.nii.gz")
    with pytest.raises(CaseError, match=r"slice\.nii\.gz: is 2D"):
        read_scan(path)


def test_single_slice_3d_image_is_refused(tmp_path):
    path = write(make_image(np.ones((1, 20, 20), np.float32)), tmp_path / "one.nii.gz")
    with pytest.raises(CaseError, match="single slice"):
        read_scan(path)


def test_4d_image_is_refused_but_a_single_volume_4d_file_is_read(tmp_path):
    four_d = sitk.JoinSeries([make_image(brain_like())] * 3)
    with pytest.raises(CaseError, match=r"4d\.nii\.gz: is 4D with 3 volumes"):
        read_scan(write(four_d, tmp_path / "4d.nii.gz"))
    one = sitk.JoinSeries([make_image(brain_like(), (0.5, 0.5, 2.0))])
    image = read_scan(write(one, tmp_path / "4d1.nii.gz"))
    assert image.GetDimension() == 3 and image.GetSpacing() == (0.5, 0.5, 2.0)


def test_vector_image_is_refused(tmp_path):
    rgb = sitk.Compose([make_image(brain_like())] * 3)
    with pytest.raises(CaseError, match="3 components"):
        read_scan(write(rgb, tmp_path / "rgb.mha"))


@pytest.mark.parametrize("fill", [0.0, np.nan])
def test_all_zero_or_all_nan_scan_is_refused(tmp_path, fill):
    path = write(make_image(np.full((10, 10, 10), fill, np.float32)), tmp_path / "blank.nii.gz")
    with pytest.raises(CaseError, match=r"blank\.nii\.gz: scan contains no non-zero finite voxel"):
        read_scan(path)


def test_scan_with_nans_is_read(tmp_path):
    array = brain_like()
    array[0] = np.nan
    image = read_scan(write(make_image(array), tmp_path / "nan.mha"))  # ITK's NIfTI writer drops NaN
    assert np.isnan(sitk.GetArrayViewFromImage(image)).any()


def test_unsupported_extension(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"x" * 10)
    with pytest.raises(CaseError, match="unsupported file type"):
        read_scan(path)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_mask_written_atomically_with_input_geometry(tmp_path, ext):
    scan = make_image(brain_like(), (0.449, 0.449, 4.0), (10.5, -3.0, 22.0), rotation(5, 10, -20))
    mask = np.zeros(brain_like().shape, np.uint8)
    mask[10, 20, 18] = 1
    out = write_image_atomic(mask_image(mask, scan), tmp_path / f"out{ext}")
    assert [p.name for p in tmp_path.iterdir()] == [f"out{ext}"]    # no temporary file left behind
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert same_geometry(back, scan)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.mha", "scan.nrrd", "scan.mhd"])
def test_compressed_files_are_not_mistaken_for_truncated_ones(tmp_path, name):
    sitk.WriteImage(make_image(brain_like()), str(tmp_path / name), True)
    assert read_scan(tmp_path / name).GetSize() == (36, 40, 20)
