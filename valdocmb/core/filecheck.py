"""What ITK does not check before it reads an image file, checked here without allocating the volume.

- The voxel data a file holds against what its header declares: ITK reads a short file (or a short but valid gzip
  stream) with the missing voxels as 0, and allocates whatever a header declares before it finds the data missing.
- NIfTI header fields that ITK silently replaces: a zero, negative or NaN voxel size becomes 1 mm.
- NaN and Inf voxels in NIfTI files, which ITK turns into 0 (they are counted from the raw data here).
- A cap on the number of voxels a header may declare.

Everything streams through the file in blocks, so a check costs one pass over the bytes and no more memory than a
block, whatever the header claims. Problems raise CaseError naming the file.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import CaseError

MAX_VOXELS = 1024**3          # larger declared volumes are refused before anything is allocated
BLOCK = 1 << 22
NIFTI_FLOATS = {16: "f4", 64: "f8"}
SIZE_CHECKED = (".mha", ".mhd", ".nrrd", ".nhdr")   # data checked against the size ITK reads from the header


def check_file(path: Path, ext: str, declared: tuple[tuple[int, ...], int] | None) -> int | None:
    """Check one image file; returns the NaN/Inf voxels counted in its raw data (NIfTI), else None.

    `declared`: (size, bytes per voxel) from ITK's header reading, for the formats not parsed here.
    """
    if ext in (".nii", ".nii.gz"):
        return _check_nifti(path)
    if declared is None or ext not in SIZE_CHECKED:
        return None
    size, voxel_bytes = declared
    expected = _capped_voxels(path, size) * voxel_bytes
    data_file, offset, compressed = (_metaimage_layout if ext in (".mha", ".mhd") else _nrrd_layout)(path)
    if not data_file.is_file():
        raise CaseError(f"{path}: its voxel data file {data_file} is missing")
    have = _payload_bytes(data_file, offset, compressed, path)
    if have < expected:
        raise CaseError(f"{path}: truncated: holds {have} bytes of voxel data, its header declares {expected}")
    return None


def _capped_voxels(path: Path, size) -> int:
    voxels = math.prod(int(s) for s in size)
    if voxels > MAX_VOXELS:
        raise CaseError(f"{path}: its header declares {'x'.join(map(str, size))} = {voxels:,} voxels, more than the "
                        f"{MAX_VOXELS:,} this program reads")
    return voxels


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _stream_error(path: Path, exc: Exception) -> CaseError:
    return CaseError(f"{path}: cannot be read as an image (corrupt or truncated gzip stream: {exc})")


def _check_nifti(path: Path) -> int | None:
    try:
        with _open(path) as stream:
            head = stream.read(540)
            header = _nifti_header(path, head)
            voxels = _capped_voxels(path, header["shape"])
            expected = voxels * header["bitpix"] // 8
            dtype = NIFTI_FLOATS.get(header["datatype"])
            dtype = np.dtype(header["endian"] + dtype) if dtype else None
            counter = _DataCounter(header["offset"], expected, dtype)
            counter.feed(head)
            while block := stream.read(BLOCK):
                counter.feed(block)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _stream_error(path, exc) from None
    if counter.data < expected:
        raise CaseError(f"{path}: truncated: holds {counter.data} bytes of voxel data, its header declares "
                        f"{'x'.join(map(str, header['shape']))} voxels of {header['bitpix'] // 8} bytes "
                        f"({expected} bytes)")
    return counter.non_finite if dtype is not None else None


def _nifti_header(path: Path, head: bytes) -> dict:
    if len(head) < 348:
        raise CaseError(f"{path}: cannot be read as an image: {len(head)} bytes, shorter than a NIfTI header (348)")
    for endian in "<>":
        sizeof = struct.unpack(endian + "i", head[:4])[0]
        if sizeof in (348, 540):
            break
    else:
        raise CaseError(f"{path}: cannot be read as an image: not a NIfTI file (its header size field is neither 348 "
                        "nor 540)")
    if sizeof == 348:
        dims = struct.unpack(endian + "8h", head[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
        pixdim = struct.unpack(endian + "8f", head[76:108])
        offset = struct.unpack(endian + "f", head[108:112])[0]
    else:
        if len(head) < 540:
            raise CaseError(f"{path}: cannot be read as an image: {len(head)} bytes, shorter than a NIfTI-2 header "
                            "(540)")
        datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
        dims = struct.unpack(endian + "8q", head[16:80])
        pixdim = struct.unpack(endian + "8d", head[104:168])
        offset = struct.unpack(endian + "q", head[168:176])[0]
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]):
        shown = dims[:ndim + 1] if 0 <= ndim <= 7 else dims
        raise CaseError(f"{path}: cannot be read as an image: invalid NIfTI dimensions {shown}")
    if bitpix <= 0 or bitpix % 8:
        raise CaseError(f"{path}: cannot be read as an image: invalid NIfTI bits per voxel ({bitpix})")
    spacing = pixdim[1:min(ndim, 3) + 1]
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise CaseError(f"{path}: invalid voxel size in the NIfTI header (pixdim {tuple(spacing)}); ITK would "
                        "read it as 1 mm")
    if not math.isfinite(offset) or offset < sizeof:
        raise CaseError(f"{path}: cannot be read as an image: invalid NIfTI data offset (vox_offset {offset})")
    return {"endian": endian, "shape": dims[1:ndim + 1], "datatype": datatype, "bitpix": bitpix,
            "offset": int(offset)}


class _DataCounter:
    """Counts the voxel-data bytes after `offset` (up to `expected`) and the non-finite values among them."""

    def __init__(self, offset: int, expected: int, dtype: np.dtype | None):
        self.position, self.offset, self.expected, self.dtype = 0, offset, expected, dtype
        self.data, self.non_finite, self.pending = 0, 0, b""

    def feed(self, block: bytes) -> None:
        start = max(self.offset - self.position, 0)
        self.position += len(block)
        block = block[start:][: max(self.expected - self.data, 0)]
        self.data += len(block)
        if self.dtype is not None and block:
            block = self.pending + block
            whole = len(block) - len(block) % self.dtype.itemsize
            values = np.frombuffer(block[:whole], self.dtype)
            self.non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
            self.pending = block[whole:]


def _header_text(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(1 << 16)


def _metaimage_layout(path: Path) -> tuple[Path, int, bool]:
    """(file holding the voxel data, where the data starts in it, whether it is zlib-compressed)."""
    text = _header_text(path)
    fields, end = {}, 0
    for line in text.split(b"\n"):
        end += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    else:
        raise CaseError(f"{path}: MetaImage header without an ElementDataFile line")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    data_file = fields["elementdatafile"]
    if data_file.upper() == "LOCAL":
        return path, end, compressed
    if data_file.upper().startswith("LIST") or "%" in data_file:
        raise CaseError(f"{path}: MetaImage data split over several files is not supported")
    header_size = int(fields.get("headersize", "0") or 0)
    return path.parent / data_file, max(header_size, 0), compressed


def _nrrd_layout(path: Path) -> tuple[Path, int, bool]:
    text = _header_text(path)
    end = text.find(b"\n\n")
    header = text[: end if end >= 0 else len(text)].decode("latin-1")
    fields = {}
    for line in header.splitlines()[1:]:
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.lstrip("=").strip()
    encoding = fields.get("encoding", "raw").lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise CaseError(f"{path}: NRRD encoding {encoding!r} is not supported (raw or gzip)")
    detached = fields.get("data file") or fields.get("datafile")
    if detached:
        return path.parent / detached, int(fields.get("byte skip", "0") or 0), encoding != "raw"
    if end < 0:
        raise CaseError(f"{path}: NRRD header without the blank line that ends it")
    return path, end + 2, encoding != "raw"


def _payload_bytes(data_file: Path, offset: int, compressed: bool, path: Path) -> int:
    """How many bytes of voxel data `data_file` holds from `offset` (decompressed when it is compressed)."""
    if not compressed:
        return max(data_file.stat().st_size - offset, 0)
    total = 0
    with open(data_file, "rb") as fh:
        fh.seek(offset)
        inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header, as ITK and NRRD write them
        try:
            while block := fh.read(BLOCK):
                total += len(inflate.decompress(block))
                if inflate.eof:
                    break
            total += len(inflate.flush())
        except zlib.error as exc:
            raise _stream_error(path, exc) from None
    return total
