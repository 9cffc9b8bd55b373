"""The new ways in with the shipped method, end to end: a DICOM series and its NIfTI conversion give the same mask,
and a BIDS dataset processed in two shards into one derivatives folder passes the official validator.

    python -m valdocmb.bench.layouts [--work DIR] [--subjects 4] [--method three-stage]

Made from the shipped example scan (tests/data/example): the DICOM series is the scan quantised to int16, one file
per slice, written by SimpleITK; the BIDS dataset holds the scan under `--subjects` participant labels, each
turned to another orientation (a permutation and flip of its axes) so that the subjects differ in geometry.
Prints the seconds of each run, the comparison and the validator's verdict.
"""

from __future__ import annotations

import argparse
import csv
import json
import locale
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.imageio import same_geometry, write_image_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tests" / "data" / "example" / "input" / "sub-001_space-T2S_desc-masked_T2S.nii.gz"


def process(*arguments: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "process.py"), *arguments], check=False,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def write_dicom_series(image: sitk.Image, folder: Path, tags: dict[str, str], skip=(), start: int = 0) -> None:
    """A classic single-frame series as a scanner writes it: one extensionless file per slice (IM<start + index>),
    the series' `tags` (modality, UIDs, description, echo time, ...) on each, and each slice's position,
    orientation, instance number and UID; slices whose index is in `skip` are left out. GDCM's writer leaves the
    process in the C (ASCII) locale, so the locale is restored afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    saved_locale = locale.setlocale(locale.LC_ALL)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # file names without extension, as PACS exports have them
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    instance = f"{tags['0020|000e']}.{tags.get('0018|0081', '0')}"
    try:
        for index in range(image.GetSize()[2]):
            if index in skip:
                continue
            piece = image[:, :, index]
            corner = image.TransformIndexToPhysicalPoint((0, 0, index))
            for key, value in {**tags, "0020|0037": orientation,
                               "0020|0032": "\\".join(f"{v:.6f}" for v in corner),
                               "0020|0013": str(index + 1), "0008|0018": f"{instance}.{index + 1}"}.items():
                piece.SetMetaData(key, value)
            writer.SetFileName(str(folder / f"IM{start + index:04d}"))
            writer.Execute(piece)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def dicom_series(image: sitk.Image, folder: Path) -> None:
    """The scan quantised to int16 as series 5 of one study, described as a T2* series."""
    array = sitk.GetArrayFromImage(image)
    scaled = sitk.GetImageFromArray(np.round(array * (30000.0 / max(float(array.max()), 1e-6))).astype(np.int16))
    scaled.CopyInformation(image)
    uid = "1.2.826.0.1.3680043.8.498.77"
    write_dicom_series(scaled, folder, {"0008|0060": "MR", "0020|000d": uid, "0020|000e": f"{uid}.5",
                                        "0020|0011": "5", "0008|103e": "t2star_tra", "0018|0081": "20",
                                        "0008|0008": "ORIGINAL\\PRIMARY\\M\\ND"})


def reoriented(image: sitk.Image, number: int) -> sitk.Image:
    """The same scan stored with other axes: `number` picks a permutation and flip."""
    orders = ([0, 1, 2], [1, 0, 2], [0, 1, 2], [1, 0, 2])
    flips = ([False, False, False], [True, False, False], [False, True, True], [True, True, False])
    turned = sitk.PermuteAxes(image, orders[number % 4])
    return sitk.Flip(turned, flips[number % 4])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "valdocmb" / "bench-layouts")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--method", default="three-stage")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    image = sitk.ReadImage(str(EXAMPLE))

    dicom_series(image, args.work / "dicom" / "export" / "S5")
    seconds_dicom = process("--input", str(args.work / "dicom"), "--output", str(args.work / "dicom-out"),
                            "--method", args.method)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(args.work / "dicom" / "export" / "S5")))
    (args.work / "nifti").mkdir()
    write_image_atomic(reader.Execute(), args.work / "nifti" / "series-005.nii.gz")
    seconds_nifti = process("--input", str(args.work / "nifti"), "--output", str(args.work / "nifti-out"),
                            "--method", args.method)
    from_dicom = sitk.ReadImage(str(args.work / "dicom-out" / "series-005_CMB.nii.gz"))
    from_nifti = sitk.ReadImage(str(args.work / "nifti-out" / "series-005_CMB.nii.gz"))
    same_voxels = bool(np.array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(from_nifti)))
    print(f"DICOM series: {seconds_dicom:.1f} s, {int(sitk.GetArrayFromImage(from_dicom).sum())} mask voxels; "
          f"its NIfTI conversion: {seconds_nifti:.1f} s; masks identical voxel for voxel: {same_voxels}; "
          f"same geometry: {same_geometry(from_dicom, from_nifti)}")

    bids = args.work / "bids"
    bids.mkdir()
    write_text_atomic(json.dumps(
        {"Name": "valdocmb layout benchmark", "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "CC0",
         "Authors": ["valdocmb", "benchmark"]}), bids / "dataset_description.json")
    write_text_atomic("The shipped example scan under several participant labels and orientations.\n", bids / "README")
    for number in range(args.subjects):
        anat = bids / f"sub-{number + 1:02d}" / "anat"
        anat.mkdir(parents=True)
        write_image_atomic(reoriented(image, number), anat / f"sub-{number + 1:02d}_T2starw.nii.gz")
        write_text_atomic(json.dumps({"EchoTime": 0.02}), anat / f"sub-{number + 1:02d}_T2starw.json")
    out = args.work / "derivatives"
    shard_seconds = [process(str(bids), str(out), "participant", "--shard", f"{k}/2", "--method", args.method)
                     for k in (1, 2)]
    with open(out / "cmb_scans.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    print(f"BIDS, {args.subjects} subjects in two shards: {shard_seconds[0]:.1f} s + {shard_seconds[1]:.1f} s; "
          f"cmb_scans.tsv: {[(r['participant_id'], r['status'], r['cmb_count']) for r in rows]}")
    validator = shutil.which("bids-validator-deno")
    if validator is None:
        print("bids-validator-deno not installed: pip install -e '.[test]'")
        return 1
    for folder in (bids, out):
        report = json.loads(subprocess.run([validator, str(folder), "--format", "json"], capture_output=True,
                                           text=True).stdout)
        issues = report["issues"]["issues"]
        errors = sorted({issue["code"] for issue in issues if issue["severity"] == "error"})
        warnings = sorted({issue["code"] for issue in issues if issue["severity"] == "warning"})
        print(f"bids-validator-deno {folder.name}: {len(errors)} error code(s) {errors}; warnings {warnings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
