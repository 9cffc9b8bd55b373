"""Segmentation methods by name; each loads its weights once and segments one scan at a time
through `segment(image, timings) -> uint8 mask on the input grid`."""

from __future__ import annotations

from pathlib import Path

from .errors import CaseError


def load(name: str, weights_dir: Path, device: str):
    if name == "three-stage":
        from .three_stage import ThreeStagePipeline

        return ThreeStagePipeline.from_weights(weights_dir, device)
    if name == "nnunet":
        raise CaseError(f"the nnU-Net method is not part of this version yet (weights folder {weights_dir})")
    raise CaseError(f"unknown method {name!r}")
