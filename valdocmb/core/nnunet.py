"""nnU-Net v2 3d_fullres baseline (Kuijf, MixMicrobleedNet): in-process inference from a baked model folder.

The model folder (`weights/nnunet`) holds nnU-Net's own dataset.json and plans.json and fold_<f>/checkpoint_final.pth
with the network weights only (no optimizer state). Inference runs inside this process through nnU-Net's
predictor: no worker processes, so a small /dev/shm does not break it. Scans are reoriented to LPS before nnU-Net
sees them, exactly as the training conversion wrote them, and the result is oriented back onto the input grid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .defaults import NNUNET_MIRRORING, NNUNET_TILE_STEP
from .errors import CaseError
from .logs import timed
from .result import SegmentationResult
from .weights import load_checked

log = logging.getLogger(__name__)

MODEL_DIR = "nnunet"                 # inside the weights folder
CONFIGURATION = "3d_fullres"
TRAINING_ORIENTATION = "LPS"
DEFAULT_TILE_STEP = NNUNET_TILE_STEP
DEFAULT_MIRRORING = NNUNET_MIRRORING


def nnunet_environment(root: Path | None = None) -> None:
    """Set nnU-Net's folder variables, which it reads once at import, so that users never have to.

    Training passes its work folder. Inference needs none of them (the predictor is set up by hand), so unset ones
    point at a temporary folder that nothing is written to; that also silences nnU-Net's warnings.
    """
    base = Path(root) if root is not None else Path(tempfile.gettempdir()) / "valdocmb-nnunet-unused"
    for variable, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                          ("nnUNet_results", "results")):
        if root is not None or variable not in os.environ:
            os.environ[variable] = str(base / sub)
    os.environ.setdefault("nnUNet_compile", "false")


@contextlib.contextmanager
def stdout_to_stderr():
    """nnU-Net prints progress to stdout; our logs belong on stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CaseError(f"{path}: missing from the nnU-Net model folder (train with `valdocmb-nnunet-train`)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(f"{path}: not valid JSON: {exc}") from None


def load_checkpoint(weights_dir: Path, relative: str) -> tuple[dict, str]:
    """An nnU-Net inference checkpoint and its sha256, through the one checksum-and-load path."""
    checkpoint, sha = load_checked(weights_dir, relative, "an nnU-Net checkpoint")
    if "network_weights" not in checkpoint:
        raise CaseError(f"{Path(weights_dir) / relative}: not an nnU-Net checkpoint (no network_weights)")
    return checkpoint, sha


def orientation_of(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


class NnUNetMethod:
    """Segments one scan at a time with nnU-Net's sliding-window predictor (all folds found are averaged)."""

    def __init__(self, model_dir: Path, device: str = "auto", tile_step: float = DEFAULT_TILE_STEP,
                 mirroring: bool = DEFAULT_MIRRORING, weights_dir: Path | None = None):
        from .device import resolve_device  # imports torch: here, so that valdocmb-nnunet-train --help needs none

        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.tile_step, self.mirroring = tile_step, mirroring
        if not self.model_dir.is_dir():
            raise CaseError(f"{self.model_dir}: no nnU-Net model folder (train one with "
                            "`valdocmb-nnunet-train`, or point --weights at a folder holding nnunet/)")
        dataset_json = read_json(self.model_dir / "dataset.json")
        plans = read_json(self.model_dir / "plans.json")
        checkpoints = sorted(self.model_dir.glob("fold_*/checkpoint_final.pth"))
        if not checkpoints:
            raise CaseError(f"{self.model_dir}: no fold_*/checkpoint_final.pth in the nnU-Net model folder")
        weights_dir = Path(weights_dir) if weights_dir is not None else self.model_dir.parent
        relatives = [path.relative_to(weights_dir).as_posix() for path in checkpoints]
        loaded, digests = zip(*(load_checkpoint(weights_dir, relative) for relative in relatives))
        self.folds = [path.parent.name.removeprefix("fold_") for path in checkpoints]
        self.predictor = self._predictor(plans, dataset_json, loaded, checkpoints)
        self.info = {
            "method": "nnunet",
            "device": str(self.device),
            "weights": {"folder": str(self.model_dir), "folds": self.folds,
                        "trainer": loaded[0].get("trainer_name"),
                        "sha256": {str(p.relative_to(self.model_dir)): d for p, d in zip(checkpoints, digests)},
                        "version": "nnunet:" + digests[0][:12]},
            "parameters": {"configuration": CONFIGURATION, "tile_step": tile_step, "mirroring": mirroring},
        }

    def _predictor(self, plans: dict, dataset_json: dict, checkpoints: list[dict], paths: list[Path]):
        nnunet_environment()
        with stdout_to_stderr():
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
            from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            plans_manager = PlansManager(plans)
            if CONFIGURATION not in plans.get("configurations", {}):
                raise CaseError(f"{self.model_dir / 'plans.json'}: has no {CONFIGURATION} configuration")
            configuration = plans_manager.get_configuration(CONFIGURATION)
            channels = determine_num_input_channels(plans_manager, configuration, dataset_json)
            labels = plans_manager.get_label_manager(dataset_json)
            network = nnUNetTrainer.build_network_architecture(
                configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                configuration.network_arch_init_kwargs_req_import, channels, labels.num_segmentation_heads,
                enable_deep_supervision=False)
            for path, checkpoint in zip(paths, checkpoints):
                try:
                    network.load_state_dict(checkpoint["network_weights"])
                except RuntimeError as exc:
                    raise CaseError(f"{path}: does not fit the network in plans.json: "
                                    f"{str(exc).splitlines()[0]}") from None
            predictor = nnUNetPredictor(tile_step_size=self.tile_step, use_gaussian=True,
                                        use_mirroring=self.mirroring,
                                        perform_everything_on_device=self.device.type == "cuda",
                                        device=self.device, verbose=False, verbose_preprocessing=False,
                                        allow_tqdm=False)
            mirror_axes = checkpoints[0].get("inference_allowed_mirroring_axes")
            predictor.manual_initialization(network, plans_manager, configuration,
                                            [c["network_weights"] for c in checkpoints], dataset_json,
                                            checkpoints[0].get("trainer_name", "nnUNetTrainer"),
                                            tuple(mirror_axes) if mirror_axes is not None else None)
        return predictor

    @classmethod
    def from_weights(cls, weights_dir: Path, device: str = "auto", **options) -> NnUNetMethod:
        return cls(Path(weights_dir) / MODEL_DIR, device, weights_dir=weights_dir, **options)

    def probability(self, image: sitk.Image, timings: dict) -> sitk.Image:
        """CMB probability (float32) on the input grid."""
        with timed(timings, "preprocess", log):
            original_orientation = orientation_of(image)
            oriented = sitk.DICOMOrient(image, TRAINING_ORIENTATION)
            array = np.nan_to_num(sitk.GetArrayFromImage(oriented).astype(np.float32), nan=0.0, posinf=0.0,
                                  neginf=0.0)
            properties = {"spacing": list(oriented.GetSpacing()[::-1])}
        with timed(timings, "nnunet", log), stdout_to_stderr():
            _, probabilities = self.predictor.predict_single_npy_array(array[None], properties, None, None, True)
        with timed(timings, "to_input_grid", log):
            probability = sitk.GetImageFromArray(np.ascontiguousarray(probabilities[1], dtype=np.float32))
            probability.CopyInformation(oriented)
            probability = sitk.DICOMOrient(probability, original_orientation)
            if probability.GetSize() != image.GetSize():
                raise CaseError(f"nnU-Net returned a {probability.GetSize()} probability map for a "
                                f"{image.GetSize()} scan")
            probability.CopyInformation(image)  # the same grid; drops rounding in the reoriented header
        return probability

    def segment(self, image: sitk.Image, timings: dict) -> SegmentationResult:
        probability = self.probability(image, timings)
        # two classes: softmax argmax is probability >= 0.5
        mask = sitk.Cast(sitk.BinaryThreshold(probability, 0.5, 2.0, 1, 0), sitk.sitkUInt8)
        return SegmentationResult(mask=mask, probability=probability, detections=[], info=self.info)


def load_method(weights_dir: Path, options) -> NnUNetMethod:
    """The registry's factory (core.methods): nnU-Net from `weights_dir` with a run's MethodOptions."""
    return NnUNetMethod.from_weights(weights_dir, options.device, **options.nnunet)
