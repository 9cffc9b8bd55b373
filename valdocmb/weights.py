"""Inference-only weight files: saving, and loading with checks that name the file and the problem.

A weight file is a torch dict {"architecture": class name, "state_dict": tensors, "meta": {...}} with no optimizer
state. weights/MANIFEST.json records each file's sha256; a file that does not match its manifest entry is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import CaseError

MANIFEST = "MANIFEST.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(model: torch.nn.Module, path: Path, meta: dict | None = None) -> str:
    """Write a model's inference state; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save({"architecture": type(model).__name__, "state_dict": state, "meta": meta or {}}, tmp)
    tmp.replace(path)
    return sha256(path)


def manifest_entry(weights_dir: Path, relative: str) -> dict | None:
    manifest = Path(weights_dir) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text()).get("files", {})
    except json.JSONDecodeError as exc:
        raise CaseError(f"{manifest}: not valid JSON: {exc}") from None
    return files.get(relative)


def weights_digest(weights_dir: Path, relative: str) -> str:
    """The file's sha256 as the manifest records it (computed when the manifest has no entry)."""
    entry = manifest_entry(weights_dir, relative)
    return entry["sha256"] if entry and entry.get("sha256") else sha256(Path(weights_dir) / relative)


def load_weights(model: torch.nn.Module, weights_dir: Path, relative: str) -> dict:
    """Load `weights_dir/relative` into `model` (strictly); returns the file's meta dict."""
    path = Path(weights_dir) / relative
    if not path.is_file():
        raise CaseError(f"{path}: weight file missing (train with `python -m valdocmb.train`, or point --weights "
                        "at a folder that has it)")
    entry = manifest_entry(weights_dir, relative)
    if entry and entry.get("sha256") and entry["sha256"] != sha256(path):
        raise CaseError(f"{path}: sha256 differs from {Path(weights_dir) / MANIFEST}; the file is corrupt or stale")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CaseError(f"{path}: cannot be loaded as a weight file: {exc}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CaseError(f"{path}: not a valdocmb weight file (no state_dict)")
    if checkpoint.get("architecture") != type(model).__name__:
        raise CaseError(f"{path}: holds a {checkpoint.get('architecture')}, expected {type(model).__name__}")
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CaseError(f"{path}: does not fit {type(model).__name__}: {str(exc).splitlines()[0]}") from None
    return checkpoint.get("meta", {})
