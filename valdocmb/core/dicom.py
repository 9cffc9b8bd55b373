"""DICOM series: which series of a folder tree are magnitude T2*-weighted or SWI scans, and reading one into a
volume with the checks a series needs (one orientation, no missing or repeated slice).

SimpleITK's GDCM reader does the DICOM work: headers, rescale slope and intercept, classic single-frame series and
multi-frame files (enhanced MR, multi-frame secondary capture). What a series is comes from its tags, never its
file names; the names our outputs get carry the series number only (no patient or study identifiers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import CaseError
from .imageio import checked_volume, itk_reason

log = logging.getLogger(__name__)

TAGS = {"modality": "0008|0060", "image_type": "0008|0008", "description": "0008|103e", "sequence": "0018|0020",
        "echo_time": "0018|0081", "inversion_time": "0018|0082", "echo_number": "0018|0086",
        "series_number": "0020|0011", "series_uid": "0020|000e", "study_uid": "0020|000d", "position": "0020|0032",
        "orientation": "0020|0037", "frames": "0028|0008"}

# a T2*-weighted or SWI magnitude series, by its description (lower case), and what rules one out
T2STAR_HINTS = ("t2*", "t2star", "t2_star", "t2s", "swi", "swan", "susc", "hemo", "haemo", "gre", "ffe", "fl2d",
                "fl3d", "mgre", "merge", "venobold", "pbw")
NOT_T2STAR = ("localizer", "localiser", "scout", "survey", "mprage", "flair", "dwi", "adc", "tof", "t1", "pha")
PHASE_TYPES = ("P", "PHASE", "REAL", "IMAGINARY")
PROJECTION_TYPES = ("MIP", "MNIP", "MINIP", "MIN IP", "MPR", "PROJECTION IMAGE")
MIN_ECHO_TIME_MS = 10.0  # shorter echoes carry too little T2* weighting to show a microbleed's bloom
DEFAULT_ECHO_TIME_MS = 20.0  # of a multi-echo series, the echo nearest this is read (--echo-time)


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(root: Path, limit: int | None = None) -> list[Path]:
    """DICOM files under `root` (any depth, hidden entries skipped), in path order; with `limit`, the first ones the
    walk meets (layout detection stops at one, without listing the whole tree first)."""
    found = []
    for path in (root.rglob("*") if limit is not None else sorted(root.rglob("*"))):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
            continue
        if is_dicom(path):
            found.append(path)
            if limit is not None and len(found) >= limit:
                break
    return found


def file_tags(path: Path) -> dict[str, str]:
    """The tags of `TAGS` that the file has, as stripped strings. CaseError when the header cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CaseError(f"{path}: not a readable DICOM file: {itk_reason(exc)}") from None
    return {name: reader.GetMetaData(tag).strip() for name, tag in TAGS.items() if reader.HasMetaDataKey(tag)}


def number(text: str | None) -> float | None:
    try:
        return float(str(text).split("\\")[0])
    except (TypeError, ValueError):
        return None


@dataclass
class Series:
    """One DICOM series: its tags (from its first file) and its files grouped by echo time (ms; None unknown)."""

    uid: str
    study_uid: str
    tags: dict[str, str]
    echoes: dict[float | None, list[Path]] = field(default_factory=dict)
    file_tags: dict[Path, dict[str, str]] = field(default_factory=dict)  # each file's, read once

    @property
    def number(self) -> int | None:
        value = number(self.tags.get("series_number"))
        return int(value) if value is not None else None

    def label(self) -> str:
        """How messages name the series: its number and description (no identifiers)."""
        description = self.tags.get("description", "")
        return f"series {self.number if self.number is not None else '?'}" + (f" ({description})" if description
                                                                              else "")

    def files(self) -> list[Path]:
        return [path for paths in self.echoes.values() for path in paths]


def group_series(files: list[Path]) -> tuple[list[Series], list[tuple[Path, str]]]:
    """The series the files make (by SeriesInstanceUID, across folders), and the files whose header failed."""
    series: dict[str, Series] = {}
    unreadable = []
    for path in files:
        try:
            tags = file_tags(path)
        except CaseError as exc:
            unreadable.append((path, str(exc)))
            continue
        uid = tags.get("series_uid") or f"no-uid:{path.parent}"
        entry = series.setdefault(uid, Series(uid, tags.get("study_uid", ""), tags))
        entry.echoes.setdefault(number(tags.get("echo_time")), []).append(path)
        entry.file_tags[path] = tags
    return list(series.values()), unreadable


def t2star_reason(tags: dict[str, str], echo_time: float | None) -> str | None:
    """None when a series' tags (of its first file) and its longest echo time (ms) say magnitude T2*-weighted or
    SWI; otherwise why it is not taken."""
    modality = tags.get("modality", "")
    if modality and modality != "MR":
        return f"modality {modality}, not MR"
    image_type = [token.strip().upper() for token in tags.get("image_type", "").split("\\")]
    shown = tags.get("image_type", "")
    if any(token in PHASE_TYPES for token in image_type):
        return f"a phase image (ImageType {shown})"
    if any(token in PROJECTION_TYPES for token in image_type):
        return f"a projection or reformat (ImageType {shown})"
    if "DERIVED" in image_type and "SWI" not in image_type:
        return f"a derived series (ImageType {shown})"
    description = tags.get("description", "").lower()
    if any(word in description for word in NOT_T2STAR):
        return f"SeriesDescription {tags.get('description')!r}: not T2*-weighted"
    if echo_time is not None and echo_time < MIN_ECHO_TIME_MS:
        return f"EchoTime {echo_time:g} ms: too short for T2* weighting"
    gradient_echo = "GR" in tags.get("sequence", "").upper().split("\\")
    if any(word in description for word in T2STAR_HINTS) or "SWI" in image_type:
        return None
    if gradient_echo and not tags.get("inversion_time") and (echo_time or 0) >= MIN_ECHO_TIME_MS:
        return None
    return (f"SeriesDescription {tags.get('description', '')!r}, EchoTime "
            f"{'unknown' if echo_time is None else f'{echo_time:g} ms'}: not recognisably T2*-weighted or SWI")


def nearest_echo(echo_times, target_ms: float) -> float:
    """Of several echo times (ms), the one nearest `target_ms`; the shorter of two equally near (BIDS and DICOM)."""
    return min(echo_times, key=lambda te: (abs(te - target_ms), te))


def choose_echo(series: Series, target_ms: float) -> tuple[float | None, list[Path]]:
    """The echo nearest `target_ms` (a single-echo series: its only one)."""
    if len(series.echoes) == 1:
        return next(iter(series.echoes.items()))
    echo = nearest_echo([te for te in series.echoes if te is not None], target_ms)
    return echo, series.echoes[echo]


def read_series(files: list[Path], folder: Path, label: str) -> sitk.Image:
    """One series' files, in the slice order `slice_stack` gave them, as a float32 volume; CaseError naming the
    folder and series when they do not make one volume (never a silently shortened volume)."""
    where = f"{folder} ({label})"
    if len(files) == 1:  # a multi-frame file holds the whole volume
        try:
            image = sitk.ReadImage(str(files[0]), imageIO="GDCMImageIO")
        except RuntimeError as exc:
            raise CaseError(f"{where}: cannot be read: {itk_reason(exc)}") from None
        if image.GetDimension() == 2 or (image.GetDimension() == 3 and image.GetSize()[2] == 1):
            raise CaseError(f"{where}: a single slice (one file of one frame); a 3D series is needed")
        return checked_volume(image, where, None)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(path) for path in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CaseError(f"{where}: cannot be read: {itk_reason(exc)}") from None
    if image.GetDimension() != 3 or image.GetSize()[2] != len(files):
        raise CaseError(f"{where}: {len(files)} files gave a volume of size {image.GetSize()}; expected one "
                        "slice per file")
    return checked_volume(image, where, None)


def slice_stack(files: list[Path], where: str, tags_of: dict[Path, dict[str, str]]) -> list[Path]:
    """The files sorted along the slice normal, after checking from their tags (`group_series` read them) that they
    make one evenly spaced stack; a single (multi-frame) file as it is. CaseError naming `where` otherwise."""
    if len(files) == 1:
        return files
    positions, orientations = [], set()
    for path in files:
        tags = tags_of[path]
        position, orientation = tags.get("position"), tags.get("orientation")
        if not position or not orientation:
            raise CaseError(f"{where}: {path.name} has no ImagePositionPatient/ImageOrientationPatient")
        try:
            positions.append([float(v) for v in position.split("\\")])
            orientations.add(tuple(round(float(v), 4) for v in orientation.split("\\")))
        except ValueError:
            raise CaseError(f"{where}: {path.name} has an unreadable position or orientation") from None
    if len(orientations) != 1:
        raise CaseError(f"{where}: its slices have {len(orientations)} different orientations; a volume needs one")
    row, column = np.array(next(iter(orientations))[:3]), np.array(next(iter(orientations))[3:])
    along = np.array(positions) @ np.cross(row, column)
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        raise CaseError(f"{where}: {int(np.sum(gaps < 1e-3))} slice(s) repeat a position (several echoes or "
                        "acquisitions mixed in one series?)")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step):
        widest = float(gaps.max())
        raise CaseError(f"{where}: incomplete series: a gap of {widest:.3g} mm where slices are {step:.3g} mm apart "
                        f"(about {round(widest / step) - 1} missing slice(s)), or unevenly spaced slices")
    return [files[i] for i in order]
