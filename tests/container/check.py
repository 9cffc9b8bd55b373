"""Run inside the built image by test.sh: prepare the example case in each input layout, then check what the
container wrote. Prints every difference and exits 1 if there is one.

  python check.py prepare EXAMPLE_DIR WORK_DIR
  python check.py check LAYOUT METHOD EXAMPLE_DIR WORK_DIR [--weights-folder DIR]

--weights-folder: the folder run.json must say the weights came from (test.sh mounts the model tarball at
/opt/ml/model, as grand-challenge does, and the container must prefer it over its baked-in weights). The output
folder must hold no other layout's mask: in invoke mode one output folder serves every invocation in turn.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from valdocmb.core.imageio import same_geometry
from valdocmb.evaluate import score_case

SCAN = "sub-001_space-T2S_desc-masked_T2S.nii.gz"
REFERENCE = "sub-001_space-T2S_CMB.nii.gz"
GC_SOCKET = "t2-star-weighted-brain-mri"
FOLDER_SCAN = "patient-001_t2star.nii.gz"  # not a VALDO name, so the plain-folder layout is detected

# what each layout must produce (relative to its output folder)
OUTPUTS = {
    "valdo2021": "images/sub-001_space-T2S_prediction.nii.gz",
    "gc": "images/cerebral-microbleed-segmentation/output.mha",
    "folder": "patient-001_t2star_CMB.nii.gz",
}


def prepare(example: Path, work: Path) -> None:
    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # NIfTI header fields that .mha cannot hold
    scan = sitk.ReadImage(str(example / "input" / SCAN))
    for layout in OUTPUTS:
        (work / layout / "input").mkdir(parents=True, exist_ok=True)
        (work / layout / "output").mkdir(parents=True, exist_ok=True)
    shutil.copy(example / "input" / SCAN, work / "valdo2021" / "input" / SCAN)
    shutil.copy(example / "input" / SCAN, work / "folder" / "input" / FOLDER_SCAN)
    socket = work / "gc" / "input" / "images" / GC_SOCKET
    socket.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(scan, str(socket / "3a1f5c2e-7b9d-4e6f-8a0b-1c2d3e4f5a6b.mha"), True)
    inputs = [{"interface": {"slug": GC_SOCKET, "kind": "Image", "super_kind": "Image",
                             "relative_path": f"images/{GC_SOCKET}"}, "image": {"pk": "example"}, "value": None}]
    (work / "gc" / "input" / "inputs.json").write_text(json.dumps(inputs, indent=2))


def check(layout: str, method: str, example: Path, work: Path, weights_folder: str | None = None) -> list[str]:
    problems = []
    scan = sitk.ReadImage(str(example / "input" / SCAN))
    output = work / layout / "output"
    for other, relative in OUTPUTS.items():
        if other != layout and (output / relative).exists():
            problems.append(f"{layout}: the output also holds {relative}, the {other} layout's mask")
    mask_path = output / OUTPUTS[layout]
    if not mask_path.is_file():
        found = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
        return [f"{layout}: {OUTPUTS[layout]} missing; the container wrote {found}"]
    mask = sitk.ReadImage(str(mask_path))
    if not same_geometry(mask, scan):
        problems.append(f"{layout}: geometry differs from the input: size {mask.GetSize()} vs {scan.GetSize()}, "
                        f"spacing {mask.GetSpacing()} vs {scan.GetSpacing()}, origin {mask.GetOrigin()} vs "
                        f"{scan.GetOrigin()}, direction {mask.GetDirection()} vs {scan.GetDirection()}")
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    if mask.GetPixelID() != sitk.sitkUInt8 or not set(values.tolist()) <= {0, 1}:
        problems.append(f"{layout}: mask is not binary uint8 ({mask.GetPixelIDTypeAsString()}, values {values[:6]})")

    expectations = json.loads((example / "expected" / "detection.json").read_text())
    if method not in expectations:
        problems.append(f"{layout}: no expected detections for method {method} in expected/detection.json")
    expected = expectations.get(method, {})
    score = score_case(sitk.ReadImage(str(example / "reference" / REFERENCE)), mask, "sub-001")
    got = {"reference_cmbs": score.n_ref, "detected": score.n_pred, "true_positives": score.tp,
           "false_negatives": score.fn}
    for key, value in got.items():
        if key in expected and expected[key] != value:
            problems.append(f"{layout}: {key} {value}, expected {expected[key]}")

    if layout == "valdo2021":
        results = json.loads((output / "results.json").read_text()) if (output / "results.json").is_file() else None
        wanted = json.loads((example / "expected" / "results.json").read_text())
        if results != wanted:
            problems.append(f"valdo2021: results.json is {json.dumps(results)}, expected {json.dumps(wanted)}")
    if layout == "folder" and not (output / "patient-001_t2star_CMB_lesions.csv").is_file():
        problems.append("folder: the lesion table patient-001_t2star_CMB_lesions.csv is missing")
    if layout == "gc":
        count_path = output / "number-of-cerebral-microbleeds.json"
        count = json.loads(count_path.read_text()) if count_path.is_file() else None
        if count != score.n_pred:
            problems.append(f"gc: number-of-cerebral-microbleeds.json says {count}, the mask has {score.n_pred}")
        regions_path = output / "cerebral-microbleed-regions.json"
        regions = json.loads(regions_path.read_text()) if regions_path.is_file() else {}
        placed = sum(regions.get(f"n_{c}", 0) for c in ("lobar", "deep", "infratentorial", "location_unknown"))
        if regions.get("location") != "ok" or placed != score.n_pred:
            problems.append(f"gc: cerebral-microbleed-regions.json is {regions or 'missing'}: expected the example "
                            f"registered (location ok) and {score.n_pred} CMB(s) placed")
    run_json = output / "run.json"
    if not run_json.is_file():
        problems.append(f"{layout}: run.json missing")
    else:
        record = json.loads(run_json.read_text())
        status = [c["status"] for c in record["cases"]]
        seconds = [c["seconds"] for c in record["cases"]]
        print(f"{layout}: {record['method'].get('method')} on {record['method'].get('device')}, {seconds} s per case,"
              f" {score.n_pred} CMB(s) detected, {score.tp}/{score.n_ref} reference CMB(s) found")
        if status != ["ok"]:
            problems.append(f"{layout}: run.json case status {status}")
        folders = {weights["folder"] for weights in weight_records(record["method"]) if weights.get("folder")}
        if weights_folder and (not folders or not all(Path(f).is_relative_to(weights_folder) for f in folders)):
            problems.append(f"{layout}: the weights came from {sorted(folders)}, not {weights_folder}")
    return problems


def weight_records(info: dict) -> list[dict]:
    """The weights records in a method's run.json entry (the ensemble's sit under its members)."""
    found = [info["weights"]] if isinstance(info.get("weights"), dict) else []
    for value in info.values():
        if isinstance(value, dict) and value is not info.get("weights"):
            found += weight_records(value)
    return found


def main(argv: list[str]) -> int:
    if argv[0] == "prepare":
        prepare(Path(argv[1]), Path(argv[2]))
        return 0
    weights_folder = argv[argv.index("--weights-folder") + 1] if "--weights-folder" in argv else None
    problems = check(argv[1], argv[2], Path(argv[3]), Path(argv[4]), weights_folder)
    for problem in problems:
        print("DIFFERENCE", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
