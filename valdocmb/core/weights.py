"""Weight files: where they come from, the one checksum-and-load path every method uses, and the three-stage format.

A three-stage weight file is a torch dict {"architecture": class name, "state_dict": tensors, "meta": {...}} with no
optimizer state; nnU-Net checkpoints are nnU-Net's own inference dicts. Either is refused, naming the file, when it
is missing, does not match its sha256 in MANIFEST.json, or cannot be loaded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from . import manifest
from .errors import CaseError
from .imageio import write_bytes_checked

if TYPE_CHECKING:  # torch is imported where it is used, so that `--help` and the weights' paths need none
    import torch

log = logging.getLogger(__name__)

# grand-challenge mounts a separately uploaded model tarball here (read-only)
UPLOADED_MODEL_DIR = Path("/opt/ml/model")
WEIGHT_ENTRIES = ("MANIFEST.json", "three_stage", "nnunet")   # what a weights folder holds at its top


# the repository's (and the image's, /opt/app) weights/ beside the package folder; a wheel installed elsewhere has none
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"


def default_weights_dir() -> Path:
    """Weights uploaded to grand-challenge (/opt/ml/model) win over CMB_WEIGHTS, which wins over the ones shipped
    with the repository and baked into the image."""
    if UPLOADED_MODEL_DIR.is_dir() and any(UPLOADED_MODEL_DIR.iterdir()):
        return UPLOADED_MODEL_DIR
    if os.environ.get("CMB_WEIGHTS"):
        return Path(os.environ["CMB_WEIGHTS"])
    return SHIPPED_WEIGHTS_DIR


def resolve_weights_dir(given: Path | None) -> Path:
    """The weights folder to use: `given` (--weights) or the default. A file or a missing folder is refused, naming
    it; a folder whose only entry is a folder holding weights (a model tarball packed with its own folder, which
    grand-challenge unpacks one level too deep) is used, and the log says so."""
    folder = Path(given) if given else default_weights_dir()
    if folder.is_file():
        raise CaseError(f"--weights {folder}: is a file; give the folder that holds three_stage/ (and nnunet/), "
                        "e.g. the repository's weights/")
    if not folder.is_dir():
        if not given and folder == SHIPPED_WEIGHTS_DIR:
            raise CaseError(f"{folder}: no weights folder here: this installation of the package has none (weights/ "
                            "ships with the repository and the image); give --weights DIR or set CMB_WEIGHTS")
        raise CaseError(f"--weights {folder}: no such folder")
    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    if (len(entries) == 1 and entries[0].is_dir() and not any((folder / name).exists() for name in WEIGHT_ENTRIES)
            and any((entries[0] / name).exists() for name in WEIGHT_ENTRIES)):
        log.warning("%s holds only the folder %s, which holds the weights: the model tarball was packed one level "
                    "too deep (pack the folder's contents, e.g. `tar -czf model.tar.gz -C weights .`); using %s",
                    folder, entries[0].name, entries[0])
        return entries[0]
    return folder


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest(weights_dir: Path, relative: str) -> str:
    """The file's sha256 as the manifest records it (computed when the manifest has no entry)."""
    recorded = manifest.entry(weights_dir, relative)
    return recorded["sha256"] if recorded and recorded.get("sha256") else sha256(Path(weights_dir) / relative)


def load_checked(weights_dir: Path, relative: str, what: str) -> tuple[dict, str]:
    """(the torch dict in `weights_dir/relative`, its sha256), checked against the manifest when it lists it.

    `what` names the kind of file in error messages ("a three-stage weight file", "an nnU-Net checkpoint").
    """
    import torch
    path = Path(weights_dir) / relative
    if not path.is_file():
        raise CaseError(f"{path}: {what} is missing (train with `valdocmb-train` / `valdocmb-nnunet-train`, or "
                        "point --weights at a folder that has it)")
    actual = sha256(path)
    recorded = manifest.entry(weights_dir, relative)
    if recorded and recorded.get("sha256") and recorded["sha256"] != actual:
        raise CaseError(f"{path}: sha256 differs from {manifest.manifest_path(weights_dir)}; the file is corrupt or "
                        "stale")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CaseError(f"{path}: cannot be loaded as {what}: {exc}") from None
    if not isinstance(checkpoint, dict):
        raise CaseError(f"{path}: not {what} (holds a {type(checkpoint).__name__})")
    damaged = non_finite_tensors(checkpoint)
    if damaged:  # the manifest's sha256 catches this too, but a folder without a manifest has only this check
        raise CaseError(f"{path}: {len(damaged)} parameter tensor(s) hold NaN or Inf values ({', '.join(damaged[:3])}"
                        f"{', ...' if len(damaged) > 3 else ''}); the file is damaged")
    return checkpoint, actual


def non_finite_tensors(value, name: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list that hold NaN or Inf."""
    import torch
    if isinstance(value, torch.Tensor):
        return [name or "tensor"] if value.is_floating_point() and not bool(torch.isfinite(value).all()) else []
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in non_finite_tensors(item, f"{name}.{key}".lstrip("."))]
    if isinstance(value, (list, tuple)):
        return [bad for i, item in enumerate(value) for bad in non_finite_tensors(item, f"{name}[{i}]")]
    return []


def save_weights(model: torch.nn.Module, path: Path, meta: dict | None = None) -> str:
    """Write a model's inference state in the three-stage format; returns the file's sha256."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save_atomic({"architecture": type(model).__name__, "state_dict": state, "meta": meta or {}}, path)
    return sha256(path)


def torch_save_atomic(value, path: Path) -> Path:
    """torch.save through the one write path (temporary file, checked, renamed): a killed save leaves no partial
    file under `path`. Saved to memory first: torch names the archive's folder after the file it writes, and the
    temporary name would make every save of the same state differ byte for byte (and in sha256)."""
    import torch
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return write_bytes_checked(lambda tmp: tmp.write_bytes(buffer.getvalue()), Path(path))


def load_weights(model: torch.nn.Module, weights_dir: Path, relative: str) -> tuple[dict, str]:
    """Load a three-stage weight file into `model` (strictly); returns (the file's meta dict, its sha256)."""
    path = Path(weights_dir) / relative
    checkpoint, sha = load_checked(weights_dir, relative, "a three-stage weight file")
    if "state_dict" not in checkpoint:
        raise CaseError(f"{path}: not a valdocmb weight file (no state_dict)")
    if checkpoint.get("architecture") != type(model).__name__:
        raise CaseError(f"{path}: holds a {checkpoint.get('architecture')}, expected {type(model).__name__}")
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CaseError(f"{path}: does not fit {type(model).__name__}: {str(exc).splitlines()[0]}") from None
    return checkpoint.get("meta", {}), sha
