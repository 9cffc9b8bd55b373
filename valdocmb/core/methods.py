"""Segmentation methods by name; each loads its weights once and segments one scan at a time
through `segment(image, timings) -> SegmentationResult` (everything on the input grid)."""

from __future__ import annotations

from pathlib import Path

from .errors import CaseError

NAMES = ("three-stage", "nnunet", "ensemble")


def load(name: str, weights_dir: Path, device: str, nnunet_options: dict | None = None, lesion_rule: bool = True,
         precision: str = "float32"):
    """The segmenter for `name`. The methods are imported here, so that `--help` and I/O errors need no torch.
    `precision` applies to the three-stage networks (nnU-Net's predictor chooses its own)."""
    if name == "three-stage":
        from .three_stage import ThreeStagePipeline

        return ThreeStagePipeline.from_weights(weights_dir, device, lesion_rule=lesion_rule, precision=precision)
    if name == "nnunet":
        from .nnunet import NnUNetMethod

        return NnUNetMethod.from_weights(weights_dir, device, **(nnunet_options or {}))
    if name == "ensemble":
        from .ensemble import EnsembleMethod

        return EnsembleMethod({member: load(member, weights_dir, device, nnunet_options, lesion_rule, precision)
                               for member in ("three-stage", "nnunet")})
    raise CaseError(f"unknown method {name!r}")
