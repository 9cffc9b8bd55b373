"""The lesion rule: which connected components of the three-stage pipeline's thresholded probability map it reports.

The U-Net segments every confirmed candidate's whole patch, so besides the microbleed it can leave small, faint
components (vessel ends, brain-edge spots). A component is kept when its highest and mean probability, its volume
and the best discrimination score of the candidates that produced it all reach the rule's minima. The rule belongs to
the weights: `valdocmb-tune` chooses it on labelled cases and stores it in MANIFEST.json under "lesion_rule";
weights without one keep every component (min_probability 0.5 is the segmentation threshold itself).

The probability map is left as the U-Net made it (the ensemble averages it); only the mask loses components.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import manifest
from .errors import CaseError
from .report import Lesion, lesion_table
from .result import SegmentationResult

MANIFEST_KEY = "lesion_rule"


@dataclass(frozen=True)
class LesionRule:
    min_probability: float = 0.5       # highest probability inside the component
    min_volume_mm3: float = 0.0
    min_discrimination: float = 0.0    # best discrimination score of the candidates whose patches made it
    min_mean_probability: float = 0.0  # mean probability over the component

    def keeps(self, lesion: Lesion) -> bool:
        discrimination = lesion.discrimination_score if lesion.discrimination_score is not None else 0.0
        return (lesion.max_probability >= self.min_probability and lesion.volume_mm3 >= self.min_volume_mm3
                and discrimination >= self.min_discrimination
                and lesion.mean_probability >= self.min_mean_probability)

    def is_noop(self) -> bool:
        return self == LesionRule()


def rule_from_manifest(weights_dir: Path) -> LesionRule:
    """The rule stored with the weights; the keep-everything rule when the manifest has none."""
    stored = manifest.read(weights_dir).get(MANIFEST_KEY)
    if not stored:
        return LesionRule()
    try:
        return LesionRule(**{name: float(stored[name]) for name in asdict(LesionRule())})
    except (KeyError, TypeError, ValueError) as exc:
        raise CaseError(f"{manifest.manifest_path(weights_dir)}: {MANIFEST_KEY!r} needs the numbers "
                        f"{', '.join(asdict(LesionRule()))} ({exc})") from None


def apply_rule(result: SegmentationResult, rule: LesionRule) -> tuple[SegmentationResult, np.ndarray, list[Lesion],
                                                                     list[bool]]:
    """(result with only the kept components in its mask, labelled components before the rule, their lesions,
    which of them were kept)."""
    labels, lesions = lesion_table(result)
    kept = [rule.keeps(lesion) for lesion in lesions]
    if all(kept):
        return result, labels, lesions, kept
    keep_ids = [lesion.id for lesion, k in zip(lesions, kept) if k]
    mask = sitk.GetImageFromArray(np.isin(labels, keep_ids).astype(np.uint8))
    mask.CopyInformation(result.mask)
    return replace(result, mask=mask), labels, lesions, kept
