"""Segmentation methods by name; each loads its weights once and segments one scan at a time."""

from __future__ import annotations

from pathlib import Path

from .errors import CaseError


def load(name: str, weights_dir: Path, device: str):
    raise CaseError(f"method {name!r} is not available in this version (weights folder {weights_dir})")
