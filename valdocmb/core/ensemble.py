"""The ensemble method: both methods on the same scan, their mean probability thresholded at 0.5."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .result import SegmentationResult


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


MEMBERS = ("three-stage", "nnunet")
