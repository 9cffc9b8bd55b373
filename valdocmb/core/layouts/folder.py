"""`folder`: a plain folder of `.nii/.nii.gz/.mha/.nrrd` scans with any names; one mask per scan, named after it,
with lesion tables, QC pictures and a summary by default."""

from __future__ import annotations

from pathlib import Path

from ..errors import RunError
from ..imageio import IMAGE_EXTENSIONS, TIFF_EXTENSIONS, image_extension
from .base import Case, Discovery, Layout, entries

FOLDER_MASK_SUFFIX = "_CMB"
OUR_SUFFIXES = (FOLDER_MASK_SUFFIX, f"{FOLDER_MASK_SUFFIX}_labels", f"{FOLDER_MASK_SUFFIX}_probability")
# a plain folder's scans: TIFF holds no 3D geometry (and a stray screenshot is no scan), so only grand-challenge's
# sockets hand it over
FOLDER_SCAN_EXTENSIONS = tuple(ext for ext in IMAGE_EXTENSIONS if ext not in TIFF_EXTENSIONS)


class Folder(Layout):
    name = "folder"
    reports_by_default = True

    @classmethod
    def detect(cls, input_dir: Path) -> bool:
        return True

    def discover(self, input_dir: Path) -> Discovery:
        found = Discovery(self, [])
        scans: list[tuple[str, str, Path]] = []
        for path in entries(input_dir, found):
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
            found.cases.append(Case(case_id, path, self.output / f"{case_id}{FOLDER_MASK_SUFFIX}{out_ext}",
                                    [path.name]))
        if not found.cases:
            raise RunError(f"{input_dir}: no image file ({', '.join(FOLDER_SCAN_EXTENSIONS)}) found")
        return found
