import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.core.errors import CaseError
from valdocmb.core.imageio import mask_image, read_mask, read_scan, same_geometry, write_image_atomic

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


# -- what ITK does not check (valdocmb/core/filecheck.py) --------------------------------------------------------

def nifti_bytes(tmp_path, array, spacing=(1.0, 1.0, 3.0)):
    path = tmp_path / "src.nii"
    sitk.WriteImage(make_image(array, spacing), str(path))
    return bytearray(path.read_bytes())


def test_a_short_but_valid_gzip_stream_is_refused(tmp_path):
    # was: read with the missing voxels as zeros, and processed
    raw = nifti_bytes(tmp_path, brain_like())
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw[:-4000])))
    with pytest.raises(CaseError, match=r"scan\.nii\.gz: truncated: holds \d+ bytes of voxel data"):
        read_scan(path)


def test_an_uncompressed_file_a_few_hundred_bytes_short_is_refused(tmp_path):
    # was: passed, since the size check ignored the 352-byte header
    raw = nifti_bytes(tmp_path, brain_like())
    path = tmp_path / "scan.nii"
    path.write_bytes(bytes(raw[:-300]))
    with pytest.raises(CaseError, match="truncated"):
        read_scan(path)


@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
@pytest.mark.parametrize("compress", [False, True])
def test_short_metaimage_and_nrrd_data_is_refused(tmp_path, ext, compress):
    path = tmp_path / f"scan{ext}"
    sitk.WriteImage(make_image(brain_like()), str(path), compress)
    whole = path.read_bytes()
    path.write_bytes(whole[:-200])
    with pytest.raises(CaseError, match="truncated|corrupt"):
        read_scan(path)


def test_a_header_declaring_a_huge_volume_is_refused_before_allocating(tmp_path):
    raw = nifti_bytes(tmp_path, brain_like())
    raw[40:48] = struct.pack("<4h", 3, 1000, 1000, 1000)
    path = tmp_path / "huge.nii.gz"               # was: 5.8 GB allocated, read as zeros beyond the data, no error
    path.write_bytes(gzip.compress(bytes(raw)))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent's image across fork and exec, so a large
    # pytest process would be counted as the child's peak
    code = ("import sys; from valdocmb.core.imageio import read_scan; from valdocmb.core.errors import "
            f"CaseError\ntry:\n    read_scan({str(path)!r})\nexcept CaseError as exc:\n    print(exc)\n"
            "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message, peak_mb = done.stdout.strip().splitlines()
    assert "huge.nii.gz: truncated" in message and "1000x1000x1000" in message
    assert int(peak_mb) < 1024


@pytest.mark.parametrize("value", [0.0, float("nan"), -3.0])
def test_an_invalid_nifti_voxel_size_is_refused_not_read_as_1_mm(tmp_path, value):
    # was: ITK read it as 1 mm, so a 3 mm scan was processed as 1 mm
    raw = nifti_bytes(tmp_path, brain_like())
    raw[88:92] = struct.pack("<f", value)        # pixdim[3]: the slice thickness
    path = tmp_path / "scan.nii"
    path.write_bytes(bytes(raw))
    with pytest.raises(CaseError, match="invalid voxel size in the NIfTI header"):
        read_scan(path)


def test_a_sheared_direction_is_refused(tmp_path):
    # determinant 1, but not orthonormal: was accepted
    image = make_image(brain_like(), direction=[[1, 0.5, 0], [0, 1, 0], [0, 0, 1]])
    path = tmp_path / "scan.mha"
    sitk.WriteImage(image, str(path))
    with pytest.raises(CaseError, match="not orthonormal"):
        read_scan(path)


def test_nan_voxels_in_nifti_are_counted_from_the_raw_data(tmp_path, caplog):
    # ITK reads NIfTI NaNs as 0: was no warning for a scan, and a NaN mask was accepted
    array = brain_like()
    array[1, 1, 1] = np.nan
    array[2, 2, 2] = np.inf
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(make_image(array), str(path))
    with caplog.at_level("WARNING"):
        read_scan(path)
    assert "2 non-finite voxels" in caplog.text
    with pytest.raises(CaseError, match="mask contains NaN or Inf"):
        read_mask(path)


def test_values_beyond_float32_are_refused_with_that_reason(tmp_path):
    # was: "all zero or all NaN", as the float32 cast made them infinite
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(make_image(np.full((6, 8, 8), 1e303)), str(path))
    with pytest.raises(CaseError, match="beyond the float32 range"):
        read_scan(path)


def test_itk_messages_lose_source_paths_and_addresses(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_NOSUCH\n"
                    "ElementDataFile = LOCAL\n" + "x" * 64)
    with pytest.raises(CaseError) as info:
        read_scan(path)
    assert "scan.mha: cannot be read as an image" in str(info.value)
    assert "0x" not in str(info.value) and ".cxx" not in str(info.value) and ".hxx" not in str(info.value)


def test_a_dangling_symbolic_link_is_named_as_such(tmp_path):
    (tmp_path / "scan.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(CaseError, match="symbolic link to a missing file"):
        read_scan(tmp_path / "scan.nii.gz")


def test_peak_memory_is_the_processs_own_not_its_parents():
    parent = np.ones(40_000_000)          # 320 MB here; Linux's ru_maxrss would hand it to the child
    code = "from valdocmb.core.logs import peak_memory_mb; print(peak_memory_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 0 < int(done.stdout) < 250 and parent.sum() > 0
