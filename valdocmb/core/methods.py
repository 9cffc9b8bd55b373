"""The segmentation methods by name: a registry that imports nothing heavy (the CLI reads it for `--method` and
`--help` without torch); each entry's factory imports its method's module when it is called.

A method loads its weights once and segments one scan at a time through `segment(image, timings) ->
SegmentationResult` (everything on the input grid; `info["weights"]["version"]` says which weights ran).
Adding a method: a module with a loader `(weights_dir, options) -> method`, a three-line factory below that imports
it, and one `MethodSpec` line in `REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import CaseError

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .result import SegmentationResult


class Method(Protocol):
    def segment(self, image: sitk.Image, timings: dict) -> SegmentationResult: ...


@dataclass(frozen=True)
class MethodOptions:
    """What a run asks of any method; each takes what applies to it."""

    device: str = "auto"
    precision: str = "float32"   # the three-stage networks' arithmetic (nnU-Net's predictor chooses its own)
    runtime: str = "torch"       # the three-stage convolutions' runtime (defaults.RUNTIMES)
    lesion_rule: bool = True     # three-stage: apply the rule stored with the weights
    batch_norm: str = "trained"  # three-stage: as "trained", or corrected on each "scan" (adaptation.py)
    nnunet: dict = field(default_factory=dict)  # nnU-Net: tile_step, mirroring


@dataclass(frozen=True)
class MethodSpec:
    name: str
    factory: Callable[[Path, MethodOptions], Method]  # loads the method; imports its module only when called
    description: str


def _three_stage(weights_dir: Path, options: MethodOptions) -> Method:
    from .three_stage import load_method

    return load_method(weights_dir, options)


def _nnunet(weights_dir: Path, options: MethodOptions) -> Method:
    from .nnunet import load_method

    return load_method(weights_dir, options)


def _ensemble(weights_dir: Path, options: MethodOptions) -> Method:
    from .ensemble import MEMBERS, EnsembleMethod

    return EnsembleMethod({member: load(member, weights_dir, options) for member in MEMBERS})


REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("three-stage", _three_stage, "screening FCN, discrimination CNN, segmentation U-Net (Chen & Dou)"),
    MethodSpec("nnunet", _nnunet, "nnU-Net v2 3d_fullres (Kuijf)"),
    MethodSpec("ensemble", _ensemble, "the mean of both methods' probabilities"),
)}


def names() -> tuple[str, ...]:
    """The registered methods (read when options are parsed, so a method registered later counts)."""
    return tuple(REGISTRY)


def load(name: str, weights_dir: Path, options: MethodOptions | None = None) -> Method:
    """The method `name`, loaded from `weights_dir`. CaseError for an unknown name (and whatever its factory
    raises for missing or damaged weights)."""
    if name not in REGISTRY:
        raise CaseError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name].factory(Path(weights_dir), options or MethodOptions())
