"""Segmentation methods by name; each loads its weights once and segments one scan at a time
through `segment(image, timings) -> SegmentationResult` (everything on the input grid)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .errors import CaseError


@dataclass
class SegmentationResult:
    mask: sitk.Image                              # uint8 0/1 with the input's geometry
    probability: sitk.Image | None = None         # float32 CMB probability with the input's geometry
    detections: list[dict] = field(default_factory=list)  # confirmed candidates: world_mm and stage scores
    info: dict = field(default_factory=dict)      # method, weights, device, parameters (for run.json)


def load(name: str, weights_dir: Path, device: str):
    if name == "three-stage":
        from .three_stage import ThreeStagePipeline

        return ThreeStagePipeline.from_weights(weights_dir, device)
    if name == "nnunet":
        raise CaseError(f"the nnU-Net method is not part of this version yet (weights folder {weights_dir})")
    raise CaseError(f"unknown method {name!r}")
