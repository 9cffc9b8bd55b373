"""What every segmentation method returns for one scan: the lowest type of the inference core."""

from __future__ import annotations

from dataclasses import dataclass, field

import SimpleITK as sitk


@dataclass
class SegmentationResult:
    mask: sitk.Image                              # uint8 0/1 with the input's geometry
    probability: sitk.Image | None = None         # float32 CMB probability with the input's geometry
    detections: list[dict] = field(default_factory=list)  # confirmed candidates: world_mm and stage scores
    info: dict = field(default_factory=dict)      # method, weights, device, parameters (for run.json)
