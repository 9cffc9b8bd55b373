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

from .errors import RunError
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


@dataclass
class Discovery:
    """What discovery found: the layout, its cases (some already failed), and the entries it ignored, with why."""

    layout: str
    cases: list[Case]
    ignored: list[tuple[Path, str]] = field(default_factory=list)


def detect_layout(input_dir: Path) -> str:
    if (input_dir / "inputs.json").is_file():
        return "gc"
    if any(VALDO_T2S.match(p.name) for p in input_dir.iterdir()):
        return "valdo2021"
    return "folder"


def discover(input_dir: Path, output_dir: Path, layout: str = "auto", input_socket: str | None = None,
             gc_output_path: str = GC_DEFAULT_OUTPUT_PATH) -> Discovery:
    """The layout in use and its cases, in a stable order. Raises RunError only when no case can be listed.

    Every entry of the input folder ends up as a case (which may carry an error: a dangling link, a folder named
    like a scan) or in `ignored` with the reason: nothing is dropped without a word.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.exists():
        raise RunError(f"{input_dir}: input folder not found")
    if not input_dir.is_dir():
        raise RunError(f"{input_dir}: is a file, not an input folder")
    if layout == "auto":
        layout = detect_layout(input_dir)
    if layout == "valdo2021":
        return _discover_valdo(input_dir, output_dir)
    if layout == "gc":
        return _discover_gc(input_dir, output_dir, input_socket, gc_output_path)
    if layout == "folder":
        return _discover_folder(input_dir, output_dir)
    raise RunError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def valdo_output_name(subject: str, space: str = "T2S") -> str:
    return f"{subject}_space-{space}_prediction.nii.gz"


def _entries(input_dir: Path, found: Discovery) -> list[Path]:
    """The folder's entries in name order; hidden ones are ignored (and said so)."""
    entries = []
    for path in sorted(input_dir.iterdir()):
        if path.name.startswith("."):
            found.ignored.append((path, "hidden file"))
        else:
            entries.append(path)
    return entries


def _discover_valdo(input_dir: Path, output_dir: Path) -> Discovery:
    found = Discovery("valdo2021", [])
    scans: dict[tuple[str, str], Path] = {}
    companions: dict[str, list[str]] = {}
    problems: list[Case] = []
    for path in _entries(input_dir, found):
        if m := VALDO_T2S.match(path.name):
            scans[(m.group(1), m.group(2))] = path  # a folder or dangling link of that name fails when read
        elif m := VALDO_COMPANION.match(path.name):
            companions.setdefault(m.group(1), []).append(path.name)
        elif VALDO_LABEL.match(path.name):
            found.ignored.append((path, "a training label (_CMB), not an input"))
        elif path.is_dir():
            found.ignored.append((path, "a folder"))
        else:
            problems.append(Case(
                strip_image_extension(path.name), path, None, [path.name],
                error=f"{path}: not a VALDO T2* file name; expected sub-<id>_space-T2S_desc-masked_T2S.nii.gz",
            ))
    subjects = [subject for subject, _ in scans]
    cases: dict[str, Case] = {}
    for (subject, space), path in sorted(scans.items()):
        # one subject under two space- labels: two cases, two masks (their names carry the label)
        case_id = subject if subjects.count(subject) == 1 else f"{subject}_space-{space}"
        cases[case_id] = Case(case_id, path, output_dir / "images" / valdo_output_name(subject, space), [path.name])
    for subject, names in sorted(companions.items()):
        owners = [case for case in cases.values() if case.case_id.split("_space-")[0] == subject]
        for case in owners:
            case.input_names.extend(names)
        if not owners:
            problems.append(Case(
                subject, None, None, names,
                error=f"{input_dir / names[0]}: {subject} has {', '.join(names)} but no T2* scan "
                f"({subject}_space-T2S_desc-masked_T2S.nii.gz)",
            ))
    if not cases and not problems:
        raise RunError(f"{input_dir}: no VALDO T2* scan (sub-*_space-*_desc-masked_T2S.nii.gz) found")
    found.cases = [cases[c] for c in sorted(cases)] + problems
    return found


OUR_SUFFIXES = (FOLDER_MASK_SUFFIX, f"{FOLDER_MASK_SUFFIX}_labels", f"{FOLDER_MASK_SUFFIX}_probability")


def _discover_folder(input_dir: Path, output_dir: Path) -> Discovery:
    found = Discovery("folder", [])
    scans: list[tuple[str, str, Path]] = []
    for path in _entries(input_dir, found):
        ext = image_extension(path)
        if path.suffix.lower() in (".raw", ".zraw"):
            found.ignored.append((path, "the data file of a .mhd header"))
        elif ext not in FOLDER_SCAN_EXTENSIONS:
            found.ignored.append((path, "not a scan file type" if ext is None else "TIFF holds no 3D geometry"))
        elif path.name[: -len(ext)].endswith(OUR_SUFFIXES):
            found.ignored.append((path, f"named like a mask or label ({FOLDER_MASK_SUFFIX}), not a scan"))
        else:
            scans.append((path.name[: -len(ext)], ext, path))
    stems = [stem for stem, _, _ in scans]
    for stem, ext, path in scans:
        # scan.nii and scan.mha side by side: each case (mask, tables, picture) carries its format in its name
        case_id = stem if stems.count(stem) == 1 else f"{stem}-{ext.strip('.').replace('.', '')}"
        # .mhd/.nhdr keep their data in a second file; write the single-file equivalent instead.
        out_ext = {".mhd": ".mha", ".nhdr": ".nrrd"}.get(ext, ext)
        found.cases.append(Case(case_id, path, output_dir / f"{case_id}{FOLDER_MASK_SUFFIX}{out_ext}", [path.name]))
    if not found.cases:
        raise RunError(f"{input_dir}: no image file ({', '.join(FOLDER_SCAN_EXTENSIONS)}) found")
    return found


def _discover_gc(input_dir: Path, output_dir: Path, input_socket: str | None, output_path: str) -> Discovery:
    found = Discovery("gc", [])
    inputs_json = input_dir / "inputs.json"
    try:
        sockets = json.loads(inputs_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{inputs_json}: cannot be parsed: {exc}") from None
    if not isinstance(sockets, list):
        raise RunError(f"{inputs_json}: expected a list of socket values")
    image_sockets = {}
    for number, entry in enumerate(sockets):
        interface = entry.get("interface") if isinstance(entry, dict) else None
        if not isinstance(interface, dict) or not interface.get("slug"):
            found.ignored.append((inputs_json, f"entry {number} is not a socket value with an interface slug"))
            continue
        kind = str(interface.get("kind", "")).lower()
        if kind in ("image", "img") or entry.get("image") is not None:
            image_sockets[interface["slug"]] = interface.get("relative_path") or f"images/{interface['slug']}"
    slug = _choose_gc_socket(image_sockets, input_socket, inputs_json)
    folder = input_dir / image_sockets[slug]
    out = output_dir / output_path / "output.mha"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in GC_IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) != 1:
        listed = ", ".join(p.name for p in files) or "none"
        found.cases = [Case(slug, None, out, [], error=f"{folder}: expected exactly one .mha/.tif image, found {listed}")]
    else:
        found.cases = [Case(slug, files[0], out, [str(files[0].relative_to(input_dir))])]
    return found


def _choose_gc_socket(image_sockets: dict[str, str], wanted: str | None, inputs_json: Path) -> str:
    if not image_sockets:
        raise RunError(f"{inputs_json}: lists no image socket")
    if wanted:
        if wanted not in image_sockets:
            raise RunError(f"{inputs_json}: no image socket {wanted!r}; present: {', '.join(image_sockets)}")
        return wanted
    if len(image_sockets) == 1:
        return next(iter(image_sockets))
    for hint in GC_T2S_SLUG_HINTS:
        for slug in image_sockets:
            if hint in slug.lower():
                return slug
    raise RunError(
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
