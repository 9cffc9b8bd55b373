"""Reading scans and writing masks with SimpleITK, with the checks that turn bad files into clear errors.

Every reader raises CaseError with the file's path in the message (what ITK itself does not check is in
`filecheck`); every writer is atomic and verified: a temporary file in the same folder, read back, then renamed,
so neither a crash nor a full disk ever leaves a partial file under a final name.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import filecheck
from .errors import CaseError
from .stopping import uninterrupted

log = logging.getLogger(__name__)

# Extensions recognised as images, longest first so ".nii.gz" wins over ".gz". TIFF is read because
# grand-challenge may hand an image socket over as .tif; it holds no slice spacing, origin or direction.
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tiff", ".tif")
TIFF_EXTENSIONS = (".tif", ".tiff")


def image_extension(path: str | Path) -> str | None:
    """The image extension of `path` (lower-cased), or None if it is not an image file name."""
    name = str(path).lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


# images `process.py` writes beside a mask (`--reports on`, `--probability`): <mask stem><suffix><mask extension>
LABELS_SUFFIX, PROBABILITY_SUFFIX = "_labels", "_probability"


def strip_image_extension(name: str) -> str:
    ext = image_extension(name)
    return name[: -len(ext)] if ext else name


def read_scan(path: str | Path) -> sitk.Image:
    """Read one 3D scalar scan as float32; refuse what cannot be a 3D T2* volume, naming the file."""
    path = Path(path)
    image, raw_non_finite = _read_checked(path)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not np.any(finite & (array != 0)):
        raise CaseError(f"{path}: scan contains no non-zero finite voxel (all zero or all NaN)")
    n_bad = array.size - int(finite.sum()) + raw_non_finite
    if n_bad:
        log.warning("%s: %d non-finite voxels (NaN/Inf) are treated as background", path, n_bad)
    return image


def read_mask(path: str | Path, cast: bool = True) -> sitk.Image:
    """Read a 3D label or probability image, as float32 unless `cast` is False (values kept; callers threshold)."""
    path = Path(path)
    image, raw_non_finite = _read_checked(path, cast)
    array = sitk.GetArrayViewFromImage(image)
    if raw_non_finite or not np.all(np.isfinite(array)):
        raise CaseError(f"{path}: mask contains NaN or Inf values")
    return image


def _read_checked(path: Path, cast: bool = True) -> tuple[sitk.Image, int]:
    """(the image, NaN/Inf voxels that the file holds but ITK read as 0)."""
    if not path.exists():
        raise CaseError(f"{path}: file not found" + (" (a symbolic link to a missing file)" if path.is_symlink()
                                                     else ""))
    if not path.is_file():
        raise CaseError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise CaseError(f"{path}: permission denied (the file is not readable by this user)")
    if path.stat().st_size == 0:
        raise CaseError(f"{path}: empty file (0 bytes)")
    ext = image_extension(path)
    if ext is None:
        raise CaseError(f"{path}: unsupported file type; expected one of {', '.join(IMAGE_EXTENSIONS)}")
    try:
        raw_non_finite = filecheck.check_file(path, ext, _declared(path, ext)) or 0
        image = sitk.ReadImage(str(path))
    except PermissionError:
        raise CaseError(f"{path}: permission denied (the file is not readable by this user)") from None
    except MemoryError:
        raise CaseError(f"{path}: too large to read into memory") from None
    except RuntimeError as exc:
        reason = itk_reason(exc)
        if "allocat" in reason.lower():
            raise CaseError(f"{path}: too large to read into memory ({reason})") from None
        raise CaseError(f"{path}: cannot be read as an image: {reason}") from None
    return checked_volume(image, str(path), ext, cast), raw_non_finite


def checked_volume(image: sitk.Image, path: str, ext: str | None, cast: bool = True) -> sitk.Image:
    """The image as one 3D scalar volume (a 4D one with a single volume is cut to 3D), refused with a CaseError
    naming `path` when it cannot be a scan: several components or volumes, a slice, bad spacing or direction."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar (grey-value) "
            "image is needed"
        )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4:
        if size[3] != 1:
            raise CaseError(f"{path}: is 4D with {size[3]} volumes (size {size}); give one 3D T2* volume per file")
        image = sitk.Extract(image, size[:3] + (0,), (0, 0, 0, 0))
        size = image.GetSize()
    elif dim != 3:
        raise CaseError(f"{path}: is {dim}D (size {size}); a 3D volume is needed")
    if min(size) < 2:
        raise CaseError(f"{path}: is a single slice (size {size}); a 3D volume is needed")
    spacing = image.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise CaseError(f"{path}: invalid voxel spacing {spacing}")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise CaseError(f"{path}: direction matrix is not orthonormal (sheared or scaled axes): "
                        f"{tuple(round(v, 4) for v in image.GetDirection())}")
    if ext in TIFF_EXTENSIONS:
        log.warning("%s: TIFF stores no slice spacing, origin or direction; read with spacing %s mm, origin %s and "
                    "identity direction, which the mask keeps. Give a .mha or NIfTI file for true 3D geometry", path,
                    tuple(round(s, 4) for s in spacing), image.GetOrigin())
    if image.GetPixelID() in (sitk.sitkFloat64, sitk.sitkInt64, sitk.sitkUInt64):
        values = sitk.GetArrayViewFromImage(image)
        largest = float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0))
        if largest > float(np.finfo(np.float32).max):
            raise CaseError(f"{path}: voxel values up to {largest:.3g}, beyond the float32 range this program "
                            "computes in")
    if cast and image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image


def _declared(path: Path, ext: str) -> tuple[tuple[int, ...], int] | None:
    """(size, bytes per voxel) as ITK reads them from the header, for the formats whose data is checked by size."""
    if ext not in filecheck.SIZE_CHECKED:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CaseError(f"{path}: cannot be read as an image: {itk_reason(exc)}") from None
    return tuple(reader.GetSize()), reader.GetNumberOfComponents() * _pixel_bytes(reader)


_ITK_NOISE = [re.compile(p) for p in (r"\(0x[0-9a-fA-F]+\)", r"\S+\.(?:cxx|hxx|txx|cpp|h)(?::\d+)?:?",
                                      r"Exception thrown in SimpleITK \S+:?", r"(?:itk::|ITK )?ERROR:",
                                      r"\b\w+ \(\s*\):")]


def itk_reason(exc: Exception) -> str:
    """ITK's message without source paths, line numbers and object addresses."""
    text = str(exc)
    for pattern in _ITK_NOISE:
        text = pattern.sub(" ", text)
    return " ".join(text.split()) or type(exc).__name__


def _pixel_bytes(reader: sitk.ImageFileReader) -> int:
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    for token, size in (("64", 8), ("32", 4), ("16", 2), ("8", 1), ("double", 8), ("float", 4)):
        if token in name:
            return size
    return 1


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """An image of a (z, y, x) array carrying the reference's exact geometry."""
    if array.shape[:3] != reference.GetSize()[::-1]:
        raise ValueError(f"array shape {array.shape} does not match image size {reference.GetSize()[::-1]}")
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 0/1 image from a (z, y, x) array, carrying the reference's exact geometry."""
    return image_like((mask > 0).astype(np.uint8), reference)


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """True if two images share size, spacing, origin and direction (within `tol`)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


TEMPORARY_PREFIX = ".tmp-"  # every temporary output file starts so: a later run removes what a killed one left


def write_image_atomic(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write `image` to `path` through a temporary file, read it back, then rename it atomically.

    SimpleITK's writer can return without error on a full disk, leaving a short or empty file: reading the file
    back (size and voxels) turns that into a CaseError naming `path`, and nothing is renamed into place.
    """
    path = Path(path)
    if image_extension(path) is None:
        raise ValueError(f"{path}: not an image file name")

    def write(tmp: Path) -> None:
        sitk.WriteImage(image, str(tmp), compress)
        written = sitk.ReadImage(str(tmp))
        if written.GetSize() != image.GetSize() or not np.array_equal(
                sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image), equal_nan=True):
            raise CaseError(f"{path}: the written file does not read back as written (disk full?)")

    return _write_verified(write, path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write text through a temporary file, flushed to disk and read back, then renamed atomically."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if tmp.read_text() != text:
            raise CaseError(f"{path}: the written file does not read back as written (disk full?)")

    return _write_verified(write, path)


def write_bytes_checked(write, path: Path) -> Path:
    """`write(tmp)` writes a file (a picture, a torch checkpoint, a pickle); it is checked non-empty and renamed
    atomically onto `path`."""

    def write_nonempty(tmp: Path) -> None:
        write(tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise CaseError(f"{path}: the written file is empty (disk full?)")

    return _write_verified(write_nonempty, Path(path))


def write_pickle_atomic(value, path: Path) -> Path:
    return write_bytes_checked(lambda tmp: tmp.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)),
                               path)


def remove_temporary_files(folder: Path, below: bool = False) -> int:
    """Remove what writes killed mid-way left in `folder` (and in its subfolders with `below`); returns how many."""
    pattern = f"{TEMPORARY_PREFIX}*"
    stale = [path for path in (Path(folder).rglob(pattern) if below else Path(folder).glob(pattern))
             if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (the longest name a write needs)."""
    return path.parent / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{path.name}"


def _write_verified(write, path: Path) -> Path:
    """The one write path: `write(tmp)` writes a temporary file beside `path` (its name ends like `path`'s, so
    format detection by extension works) and checks it, raising CaseError when it does not read back; it is then
    renamed onto `path`, never interrupted by SIGTERM. Nothing partial stays under `path` or beside it."""
    _make_folder(path)
    tmp = temporary_path(path)
    try:
        with uninterrupted():
            write(tmp)
            os.replace(tmp, path)
    except RuntimeError as exc:  # SimpleITK reports its I/O failures so
        raise CaseError(f"{path}: could not be written (disk full or not writable?): {itk_reason(exc)}") from None
    except OSError as exc:
        raise CaseError(f"{path}: could not be written: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _make_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaseError(f"{path.parent}: cannot be created as a folder for {path.name}: "
                        f"{exc.strerror or exc}") from None
