"""The three input/output layouts a user can hand the container (see the VALDO contract):

- `valdo2021`: flat gzipped NIfTI per case, `sub-XXX_space-T2S_desc-masked_T2S.nii.gz` (+ T1/T2 companions),
  masks to `images/sub-XXX_space-T2S_prediction.nii.gz`, and `results.json` as the 2021 evalutils containers wrote it.
- `gc`: current grand-challenge sockets: `inputs.json`, one `.mha`/`.tif` per image socket folder, the mask to
  `<output relative_path>/output.mha`.
- `folder`: a plain folder of `.nii/.nii.gz/.mha/.nrrd` scans with any names; one mask per scan, named after it.

Discovery never reads images; it only decides which files make which case. Problems with individual files become
`Case`s that carry an error, so one bad file never hides the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .imageio import IMAGE_EXTENSIONS, TIFF_EXTENSIONS, image_extension, strip_image_extension

LAYOUTS = ("auto", "valdo2021", "gc", "folder")

VALDO_T2S = re.compile(r"^(sub-[A-Za-z0-9]+)_space-([A-Za-z0-9]+)_desc-masked_T2S\.nii\.gz$")
VALDO_COMPANION = re.compile(r"^(sub-[A-Za-z0-9]+)_space-([A-Za-z0-9]+)_desc-masked_(T1|T2)\.nii\.gz$")
VALDO_LABEL = re.compile(r"^(sub-[A-Za-z0-9]+)_space-([A-Za-z0-9]+)_CMB\.nii\.gz$")

# Grand-challenge socket names (slugs) that hold the T2* scan, tried in this order when several image sockets exist.
GC_T2S_SLUG_HINTS = ("t2-star", "t2star", "t2s", "swi", "gre")
GC_DEFAULT_OUTPUT_PATH = "images/cerebral-microbleed-segmentation"
GC_IMAGE_SUFFIXES = (".mha", *TIFF_EXTENSIONS)
FOLDER_MASK_SUFFIX = "_CMB"
# a plain folder's scans: TIFF holds no 3D geometry (and a stray screenshot is no scan), so only grand-challenge's
# sockets hand it over
FOLDER_SCAN_EXTENSIONS = tuple(ext for ext in IMAGE_EXTENSIONS if ext not in TIFF_EXTENSIONS)


@dataclass
class Case:
    """One scan to process, where its mask goes, and what results.json says about its inputs."""

    case_id: str
    input_path: Path | None
    output_path: Path | None
    input_names: list[str] = field(default_factory=list)
    error: str | None = None  # set when discovery already knows the case cannot run


def detect_layout(input_dir: Path) -> str:
    if (input_dir / "inputs.json").is_file():
        return "gc"
    if any(VALDO_T2S.match(p.name) for p in input_dir.iterdir() if p.is_file()):
        return "valdo2021"
    return "folder"


def discover(input_dir: Path, output_dir: Path, layout: str = "auto", input_socket: str | None = None,
             gc_output_path: str = GC_DEFAULT_OUTPUT_PATH) -> tuple[str, list[Case]]:
    """The layout in use and its cases, in a stable order. Raises ValueError only when no case can be listed."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise ValueError(f"{input_dir}: input folder not found")
    if layout == "auto":
        layout = detect_layout(input_dir)
    if layout == "valdo2021":
        return layout, _discover_valdo(input_dir, output_dir)
    if layout == "gc":
        return layout, _discover_gc(input_dir, output_dir, input_socket, gc_output_path)
    if layout == "folder":
        return layout, _discover_folder(input_dir, output_dir)
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def valdo_output_name(subject: str, space: str = "T2S") -> str:
    return f"{subject}_space-{space}_prediction.nii.gz"


def _discover_valdo(input_dir: Path, output_dir: Path) -> list[Case]:
    cases: dict[str, Case] = {}
    companions: dict[str, list[str]] = {}
    problems: list[Case] = []
    for path in sorted(p for p in input_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        if m := VALDO_T2S.match(path.name):
            subject, space = m.group(1), m.group(2)
            cases[subject] = Case(
                subject, path, output_dir / "images" / valdo_output_name(subject, space), [path.name]
            )
        elif m := VALDO_COMPANION.match(path.name):
            companions.setdefault(m.group(1), []).append(path.name)
        elif VALDO_LABEL.match(path.name):
            continue  # a training label lying beside the scans is not an input
        else:
            problems.append(Case(
                strip_image_extension(path.name), path, None, [path.name],
                error=f"{path}: not a VALDO T2* file name; expected sub-<id>_space-T2S_desc-masked_T2S.nii.gz",
            ))
    for subject, names in sorted(companions.items()):
        if subject in cases:
            cases[subject].input_names.extend(names)
        else:
            problems.append(Case(
                subject, None, None, names,
                error=f"{input_dir / names[0]}: {subject} has {', '.join(names)} but no T2* scan "
                f"({subject}_space-T2S_desc-masked_T2S.nii.gz)",
            ))
    if not cases and not problems:
        raise ValueError(f"{input_dir}: no VALDO T2* scan (sub-*_space-*_desc-masked_T2S.nii.gz) found")
    return [cases[s] for s in sorted(cases)] + problems


def _discover_folder(input_dir: Path, output_dir: Path) -> list[Case]:
    cases = []
    for path in sorted(p for p in input_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        ext = image_extension(path)
        if ext not in FOLDER_SCAN_EXTENSIONS or path.suffix.lower() in (".raw", ".zraw"):
            continue  # not an image (or the data file of a .mhd header)
        stem = path.name[: -len(ext)]
        if stem.endswith(FOLDER_MASK_SUFFIX) or f"{FOLDER_MASK_SUFFIX}_" in stem:
            continue  # one of our own outputs (mask, labels, probability), or a label next to its scan
        # .mhd/.nhdr keep their data in a second file; write the single-file equivalent instead.
        out_ext = {".mhd": ".mha", ".nhdr": ".nrrd"}.get(ext, ext)
        cases.append(Case(stem, path, output_dir / f"{stem}{FOLDER_MASK_SUFFIX}{out_ext}", [path.name]))
    if not cases:
        raise ValueError(f"{input_dir}: no image file ({', '.join(FOLDER_SCAN_EXTENSIONS)}) found")
    return cases


def _discover_gc(input_dir: Path, output_dir: Path, input_socket: str | None, output_path: str) -> list[Case]:
    inputs_json = input_dir / "inputs.json"
    try:
        sockets = json.loads(inputs_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{inputs_json}: cannot be parsed: {exc}") from None
    if not isinstance(sockets, list):
        raise ValueError(f"{inputs_json}: expected a list of socket values")
    image_sockets = {}
    for entry in sockets:
        interface = entry.get("interface", {}) if isinstance(entry, dict) else {}
        kind = str(interface.get("kind", "")).lower()
        if kind in ("image", "img") or entry.get("image") is not None:
            image_sockets[interface.get("slug", "")] = interface.get("relative_path") or f"images/{interface.get('slug')}"
    slug = _choose_gc_socket(image_sockets, input_socket, inputs_json)
    folder = input_dir / image_sockets[slug]
    out = output_dir / output_path / "output.mha"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in GC_IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        return [Case(slug, None, out, [], error=f"{folder}: expected exactly one .mha/.tif image, found {found}")]
    return [Case(slug, files[0], out, [str(files[0].relative_to(input_dir))])]


def _choose_gc_socket(image_sockets: dict[str, str], wanted: str | None, inputs_json: Path) -> str:
    if not image_sockets:
        raise ValueError(f"{inputs_json}: lists no image socket")
    if wanted:
        if wanted not in image_sockets:
            raise ValueError(f"{inputs_json}: no image socket {wanted!r}; present: {', '.join(image_sockets)}")
        return wanted
    if len(image_sockets) == 1:
        return next(iter(image_sockets))
    for hint in GC_T2S_SLUG_HINTS:
        for slug in image_sockets:
            if hint in slug.lower():
                return slug
    raise ValueError(
        f"{inputs_json}: several image sockets ({', '.join(image_sockets)}) and none looks like T2*; "
        "name it with --input-socket"
    )


def valdo_results_entry(case: Case, error: str | None) -> dict:
    """One results.json entry, as the VALDO 2021 (evalutils-era) containers wrote it."""
    outputs = [] if error or case.output_path is None else [
        {"type": "metaio_image", "filename": [case.output_path.name]}
    ]
    return {
        "outputs": outputs,
        "inputs": [{"type": "metaio_image", "filename": list(case.input_names)}],
        "error_messages": [error] if error else [],
    }
