"""Segmentation methods by name; each loads its weights once and segments one scan at a time
through `segment(image, timings) -> SegmentationResult` (everything on the input grid)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import CaseError

NAMES = ("three-stage", "nnunet", "ensemble")
# nnU-Net inference defaults, chosen by measurement (README, "nnU-Net baseline")
NNUNET_TILE_STEP = 0.5
NNUNET_MIRRORING = False


@dataclass
class SegmentationResult:
    mask: sitk.Image                              # uint8 0/1 with the input's geometry
    probability: sitk.Image | None = None         # float32 CMB probability with the input's geometry
    detections: list[dict] = field(default_factory=list)  # confirmed candidates: world_mm and stage scores
    info: dict = field(default_factory=dict)      # method, weights, device, parameters (for run.json)


class EnsembleMethod:
    """Both methods on the same scan; the CMB probability is their mean, thresholded at 0.5.

    A voxel is kept when both methods lean towards CMB, or when one is nearly sure and the other not against it:
    a mimic that one method confirmed needs the other's support to survive. The lesion table keeps the
    three-stage pipeline's stage scores.
    """

    def __init__(self, members: dict, threshold: float = 0.5):
        self.members = members
        self.threshold = threshold

    def segment(self, image: sitk.Image, timings: dict) -> SegmentationResult:
        results = {}
        for name, method in self.members.items():
            own: dict = {}
            results[name] = method.segment(image, own)
            timings.update({f"{name}.{stage}": seconds for stage, seconds in own.items()})
        return self.combine(image, results)

    def combine(self, image: sitk.Image, results: dict[str, SegmentationResult]) -> SegmentationResult:
        probabilities = [sitk.GetArrayFromImage(r.probability if r.probability is not None else r.mask)
                         .astype(np.float32) for r in results.values()]
        mean = np.mean(probabilities, axis=0)
        probability = sitk.GetImageFromArray(mean)
        probability.CopyInformation(image)
        mask = sitk.GetImageFromArray((mean >= self.threshold).astype(np.uint8))
        mask.CopyInformation(image)
        detections = results["three-stage"].detections if "three-stage" in results else []
        infos = {name: r.info for name, r in results.items()}
        version = "+".join(str((i.get("weights") or {}).get("version", "")) for i in infos.values())
        info = {"method": "ensemble", "members": infos, "weights": {"version": version},
                "parameters": {"combination": "mean of the members' probabilities", "threshold": self.threshold}}
        return SegmentationResult(mask, probability, detections, info)


def load(name: str, weights_dir: Path, device: str, nnunet_options: dict | None = None, lesion_rule: bool = True):
    if name == "three-stage":
        from .three_stage import ThreeStagePipeline

        return ThreeStagePipeline.from_weights(weights_dir, device, lesion_rule=lesion_rule)
    if name == "nnunet":
        from .nnunet_method import NnUNetMethod

        return NnUNetMethod.from_weights(weights_dir, device, **(nnunet_options or {}))
    if name == "ensemble":
        return EnsembleMethod({member: load(member, weights_dir, device, nnunet_options, lesion_rule)
                               for member in ("three-stage", "nnunet")})
    raise CaseError(f"unknown method {name!r}")
