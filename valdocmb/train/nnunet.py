"""Train the nnU-Net v2 3d_fullres baseline on a VALDO-layout folder and bake an inference model folder.

One command does it all, each step with nnU-Net's own tools:
  1. conversion: every scan with a *_CMB label becomes Dataset<id>_<name> (channel T2star, labels 0/1), reoriented
     to LPS as inference will see it (NaNs to 0; the label must share the scan's grid);
  2. fingerprint, experiment planning and preprocessing of 3d_fullres;
  3. training of fold 'all' (or the folds asked for) with nnUNetTrainerCMB: nnU-Net's default trainer with the
     schedule from the command line, a checkpoint after every epoch, and resumption from it;
  4. baking: dataset.json, plans.json and fold_<f>/checkpoint_final.pth holding the network weights only (float16),
     recorded in MANIFEST.json of the weights folder.

Fine-tuning (`--init WEIGHTS`): the given model's plans replace planning (the same network, patch and spacing, so its
weights fit), the new cases are preprocessed with them, and training starts from the given network weights at
--learning-rate (default 1e-3, a tenth of nnU-Net's); the manifest names the parent model.

nnU-Net's folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) are set from --work; nothing is asked of the
user. nnU-Net's default schedule is 1000 epochs x 250 iterations (`--epochs 1000 --iterations 250`). The command is
`valdocmb-nnunet-train` (`python -m valdocmb.nnunet_train`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..core import manifest
from ..core.errors import CaseError
from ..core.imageio import read_mask, read_scan, same_geometry, write_image_atomic, write_text_atomic
from ..core.logs import setup_logging
from ..core.nnunet import CONFIGURATION, MODEL_DIR, TRAINING_ORIENTATION, nnunet_environment, stdout_to_stderr
from ..core.weights import sha256, torch_save_atomic
from .samples import find_training_cases

if TYPE_CHECKING:  # torch is imported where it is used, so that --help needs none
    import torch

log = logging.getLogger("valdocmb.nnunet_train")

TRAINER_NAME = "nnUNetTrainerCMB"
# The baked checkpoint names nnU-Net's own default trainer: ours differs from it only in the schedule and the
# checkpoint frequency, which inference never uses, and nnU-Net's tools (nnUNetv2_predict_from_modelfolder) look the
# trainer up by name among nnU-Net's own classes, where nnUNetTrainerCMB does not exist.
INFERENCE_TRAINER_NAME = "nnUNetTrainer"


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def convert_case(scan_path: Path, label_path: Path, image_out: Path, label_out: Path) -> int:
    """Write one case in nnU-Net's raw layout; returns the number of CMB voxels."""
    scan = read_scan(scan_path)
    label = read_mask(label_path)
    if not same_geometry(scan, label):
        raise CaseError(f"{label_path}: label grid differs from its scan {scan_path}")
    array = np.nan_to_num(sitk.GetArrayFromImage(scan).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    clean = sitk.GetImageFromArray(array)
    clean.CopyInformation(scan)
    binary = sitk.Cast(sitk.BinaryThreshold(label, 0.5, 1e9, 1, 0), sitk.sitkUInt8)
    write_image_atomic(sitk.DICOMOrient(clean, TRAINING_ORIENTATION), image_out)
    write_image_atomic(sitk.DICOMOrient(binary, TRAINING_ORIENTATION), label_out)
    return int(sitk.GetArrayViewFromImage(binary).sum())


def convert_dataset(source: Path, raw_root: Path, dataset_id: int, name: str, max_cases: int | None = None) -> Path:
    """VALDO-layout folder -> nnU-Net v2 raw dataset (existing converted cases are kept)."""
    cases = find_training_cases(source)[:max_cases]
    if not cases:
        raise CaseError(f"{source}: no scan with a label (sub-*_space-T2S_desc-masked_T2S.nii.gz + _CMB.nii.gz)")
    folder = raw_root / dataset_name(dataset_id, name)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    wanted = {subject for subject, _, _ in cases}
    for stale in (folder / "labelsTr").glob("*.nii.gz"):  # a rerun with fewer cases must not train on more
        if stale.name.removesuffix(".nii.gz") not in wanted:
            stale.unlink()
            (folder / "imagesTr" / stale.name.replace(".nii.gz", "_0000.nii.gz")).unlink(missing_ok=True)
    start = time.perf_counter()
    for index, (subject, scan, label) in enumerate(cases, 1):
        image_out, label_out = folder / "imagesTr" / f"{subject}_0000.nii.gz", folder / "labelsTr" / f"{subject}.nii.gz"
        if not (image_out.is_file() and label_out.is_file()):
            convert_case(scan, label, image_out, label_out)
        if index % 10 == 0 or index == len(cases):
            log.info("converted %d/%d cases (%.0f s)", index, len(cases), time.perf_counter() - start)
    dataset_json = {
        "channel_names": {"0": "T2star"},      # any name but "CT" gives nnU-Net's per-case z-score
        "labels": {"background": 0, "CMB": 1},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "description": f"cerebral microbleeds, converted by valdocmb {__version__} from {source}",
    }
    write_text_atomic(json.dumps(dataset_json, indent=2), folder / "dataset.json")
    return folder


def plan_and_preprocess(dataset_id: int, workers: int, gpu_memory_gb: float | None,
                        parent_plans: Path | None = None) -> None:
    """nnU-Net's fingerprint, planning and preprocessing; with `parent_plans`, those plans instead of planning."""
    with stdout_to_stderr():
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
        from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

        extract_fingerprints([dataset_id], num_processes=workers, check_dataset_integrity=True, clean=True,
                             verbose=False)
        if parent_plans is None:
            plan_experiments([dataset_id], gpu_memory_target_in_gb=gpu_memory_gb)
        else:
            plans = json.loads(parent_plans.read_text())
            plans["dataset_name"] = convert_id_to_dataset_name(dataset_id)
            target = Path(nnUNet_preprocessed) / plans["dataset_name"]
            write_text_atomic(json.dumps(plans, indent=1), target / "nnUNetPlans.json")
            shutil.copy(Path(nnUNet_raw) / plans["dataset_name"] / "dataset.json", target / "dataset.json")
        preprocess([dataset_id], configurations=(CONFIGURATION,), num_processes=(workers,))


def trainer_class(epochs: int, iterations: int, val_iterations: int, learning_rate: float | None = None,
                  pretrained: Path | None = None):
    """nnU-Net's default trainer with our schedule and a checkpoint every epoch (so a stopped run resumes); with
    `pretrained`, a baked checkpoint whose network weights it starts from (all layers: the labels are the same)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cuda = torch.device("cuda")  # nnU-Net's own trainer default

    class nnUNetTrainerCMB(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold, dataset_json: dict, device: torch.device = cuda):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = epochs
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations
            self.save_every = 1
            if learning_rate:
                self.initial_lr = learning_rate

        def initialize(self):
            fresh = not self.was_initialized
            super().initialize()
            if fresh and pretrained is not None:  # a resumed run then loads its own checkpoint over these
                network = getattr(self.network, "_orig_mod", self.network)
                state = torch.load(pretrained, map_location=self.device, weights_only=False)["network_weights"]
                network.load_state_dict({key: value.float() for key, value in state.items()})
                self.print_to_log_file(f"network weights from {pretrained}")

    return nnUNetTrainerCMB


def train_fold(dataset_id: int, name: str, fold, schedule: dict, device: torch.device) -> Path:
    """Train (or resume) one fold; returns its nnU-Net output folder."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    preprocessed = Path(nnUNet_preprocessed) / dataset_name(dataset_id, name)
    plans = load_json(str(preprocessed / "nnUNetPlans.json"))
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    trainer = trainer_class(**schedule)(plans, CONFIGURATION, fold, dataset_json, device)
    output = Path(trainer.output_folder)
    if (output / "checkpoint_final.pth").is_file():
        log.info("fold %s already trained: %s", fold, output / "checkpoint_final.pth")
        return output
    latest = output / "checkpoint_latest.pth"
    if latest.is_file():
        trainer.load_checkpoint(str(latest))
        log.info("fold %s: resuming at epoch %d from %s", fold, trainer.current_epoch, latest)
    trainer.run_training()
    return output


def half_precision(state: dict) -> dict:
    """float16 copies (half the file; the predictor loads them into its float32 network). nnU-Net's state dict
    names some tensors twice (aliases such as `conv.weight` and `all_modules.0.weight`): they stay one tensor, so
    torch.save writes each once."""
    copies: dict = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().cpu().half() if tensor.is_floating_point() else tensor.detach().cpu()
        out[name] = copies[key]
    return out


def bake(result_folders: dict, preprocessed: Path, weights_out: Path, record: dict) -> dict:
    """Copy an inference-only model folder into the weights folder and record it in MANIFEST.json."""
    import torch

    model_dir = weights_out / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    shutil.copy(preprocessed / "nnUNetPlans.json", model_dir / "plans.json")
    shutil.copy(preprocessed / "dataset.json", model_dir / "dataset.json")
    entries = {}
    for fold, folder in result_folders.items():
        checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        inference = {
            "network_weights": half_precision(checkpoint["network_weights"]),
            "trainer_name": INFERENCE_TRAINER_NAME,
            "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
            "init_args": {"configuration": CONFIGURATION, "fold": str(fold)},
        }
        relative = f"{MODEL_DIR}/fold_{fold}/checkpoint_final.pth"
        torch_save_atomic(inference, weights_out / relative)
        logging_record = checkpoint.get("logging", {})
        epoch_seconds = [end - start for start, end in zip(logging_record.get("epoch_start_timestamps", []),
                                                           logging_record.get("epoch_end_timestamps", []))]
        entries[relative] = {
            "sha256": sha256(weights_out / relative), "bytes": (weights_out / relative).stat().st_size,
            "architecture": "nnU-Net v2 " + CONFIGURATION + " (plans.json)", "method": "nnunet", "fold": str(fold),
            "stored_as": "float16 network weights only (no optimizer state); trainer_name "
                         f"{INFERENCE_TRAINER_NAME} (trained with {checkpoint['trainer_name']}, the same network)",
            "training": {**record, "seconds": {**record["seconds"], "training": round(sum(epoch_seconds))}},
            "final_epoch": {key: round(float(values[-1]), 4) for key, values in logging_record.items()
                            if key in ("train_losses", "val_losses", "ema_fg_dice", "mean_fg_dice") and values},
        }
    for extra in ("plans.json", "dataset.json"):
        entries[f"{MODEL_DIR}/{extra}"] = {"sha256": sha256(model_dir / extra), "method": "nnunet"}

    def change(content: dict) -> None:  # the new model folder replaces every entry of the previous one
        content["files"] = {k: v for k, v in content["files"].items() if not k.startswith(MODEL_DIR + "/")}
        content["files"].update(entries)

    return manifest.update(weights_out, change)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="valdocmb-nnunet-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="VALDO-layout folder with *_CMB.nii.gz labels")
    parser.add_argument("--out", type=Path, default=Path("weights"), help="weights folder to bake the model into")
    parser.add_argument("--work", type=Path, default=Path("runs/nnunet"),
                        help="nnU-Net's raw, preprocessed and results folders")
    parser.add_argument("--dataset-id", type=int, default=501)
    parser.add_argument("--name", default="VALDOCMB")
    parser.add_argument("--folds", nargs="+", default=["all"], help="'all' (default) or fold numbers 0-4")
    parser.add_argument("--epochs", type=int, default=1000, help="nnU-Net's default: 1000")
    parser.add_argument("--iterations", type=int, default=250, help="training iterations per epoch (default 250)")
    parser.add_argument("--val-iterations", type=int, default=50, help="validation iterations per epoch (default 50)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="the planner's memory target, which sets the patch size (nnU-Net's default: 8)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="processes for preprocessing and data augmentation")
    parser.add_argument("--max-cases", type=int, default=None, help="use only the first N cases")
    parser.add_argument("--init", type=Path, default=None,
                        help="fine-tune: start from the nnU-Net model in this weights folder (its plans, its weights)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="initial learning rate (nnU-Net's default 1e-2; 1e-3 with --init)")
    args = parser.parse_args(argv)
    setup_logging()
    parent: dict[str, Path] | None = None
    if args.init:
        found = parent_model(args.init)
        if isinstance(found, str):
            log.error("%s", found)
            return 2
        parent = found
        if args.out.resolve() == args.init.resolve():
            log.error("--out %s is the --init folder: bake the fine-tuned model into a new folder", args.out)
            return 2
        args.learning_rate = args.learning_rate or 1e-3
    nnunet_environment(args.work.resolve())
    os.environ.setdefault("nnUNet_n_proc_DA", str(args.workers))
    import torch

    from ..core.device import resolve_device

    device = resolve_device(args.device)
    started = time.perf_counter()
    try:
        folder = convert_dataset(args.data, Path(os.environ["nnUNet_raw"]), args.dataset_id, args.name,
                                 args.max_cases)
    except CaseError as exc:
        log.error("%s", exc)
        return 2
    converted = time.perf_counter()
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / folder.name
    step_seconds_path = args.work / "step_seconds.json"  # kept so that a resumed run still reports them
    if not (preprocessed / ".valdocmb-preprocessed").is_file():
        log.info("nnU-Net fingerprint, planning and preprocessing of %s", folder.name)
        plan_and_preprocess(args.dataset_id, args.workers, args.gpu_memory_gb,
                            parent["plans"] if parent else None)
        write_text_atomic("ok\n", preprocessed / ".valdocmb-preprocessed")
        seconds = {"conversion": round(converted - started),
                   "plan_and_preprocess": round(time.perf_counter() - converted)}
        write_text_atomic(json.dumps(seconds), step_seconds_path)
    step_seconds = json.loads(step_seconds_path.read_text()) if step_seconds_path.is_file() else {}
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"][CONFIGURATION]
    log.info("3d_fullres plan: patch %s, spacing %s, batch %s", plans["patch_size"], plans["spacing"],
             plans["batch_size"])

    schedule = {"epochs": args.epochs, "iterations": args.iterations, "val_iterations": args.val_iterations}
    if args.learning_rate:  # else nnU-Net's own initial rate
        schedule["learning_rate"] = args.learning_rate
    folds = [fold if fold == "all" else int(fold) for fold in args.folds]
    results = {}
    with stdout_to_stderr():
        for fold in folds:
            results[fold] = train_fold(args.dataset_id, args.name, fold,
                                       {**schedule, "pretrained": parent["checkpoint"] if parent else None}, device)
    record = {
        "data": str(args.data), "cases": json.loads((folder / "dataset.json").read_text())["numTraining"],
        "subjects": sorted(p.name.removesuffix(".nii.gz") for p in (folder / "labelsTr").glob("*.nii.gz")),
        "trainer": TRAINER_NAME, "schedule": schedule,
        "nnunet_default_schedule": {"epochs": 1000, "iterations": 250, "val_iterations": 50},
        "gpu_memory_target_gb": args.gpu_memory_gb or 8, "plan": {k: plans[k] for k in ("patch_size", "spacing",
                                                                                           "batch_size")},
        "command": manifest.command_line("valdocmb-nnunet-train", argv),
        "device": str(device), "hardware": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "seconds": step_seconds,  # training seconds per fold are added by bake()
        "package_version": __version__, "torch": torch.__version__, "nnunetv2": _nnunet_version(),
    }
    if parent:
        record["parent"] = {"folder": str(args.init), "checkpoint": str(parent["checkpoint"]),
                            "sha256": sha256(parent["checkpoint"])}
    bake(results, preprocessed, args.out, record)
    log.info("nnU-Net model baked into %s (%.0f s)", args.out / MODEL_DIR, time.perf_counter() - started)
    return 0


def parent_model(weights: Path) -> dict[str, Path] | str:
    """The nnU-Net model in a weights folder to fine-tune ({"plans", "checkpoint"}: fold 'all' when it has one), or
    what is missing."""
    model = Path(weights) / MODEL_DIR
    checkpoints = sorted(model.glob("fold_*/checkpoint_final.pth"), key=lambda p: p.parent.name != "fold_all")
    if not (model / "plans.json").is_file() or not checkpoints:
        return (f"--init {weights}: no nnU-Net model ({MODEL_DIR}/plans.json and "
                f"{MODEL_DIR}/fold_*/checkpoint_final.pth)")
    return {"plans": model / "plans.json", "checkpoint": checkpoints[0]}


def _nnunet_version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


if __name__ == "__main__":
    sys.exit(main())
