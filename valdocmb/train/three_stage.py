"""Training the three stages on a sample pool, and writing inference weights with their manifest entries.

Protocol (Chen & Dou): screening first on positives and random negatives (the initial model), false positives mined
with it, then screening again on positives : random negatives : mined false positives = 1:2:1; discrimination on
positives and mined false positives; segmentation (U-Net) on positives and mined false positives. Screening and
discrimination: cross entropy weighted 0.25 (background) / 0.75 (CMB), SGD with Nesterov momentum 0.99, learning
rate 1e-2 with poly decay (1 - it/max)^0.9. Segmentation: soft Dice loss, Adam. Samples are re-drawn every
iteration. Each stage checkpoints after every iteration (model, optimizer, random state) under the work folder and
resumes from there; the final weights hold inference state only. The command is `valdocmb-train`
(valdocmb/train/__main__.py).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import multiprocessing
import pickle
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.models.segmentation import SegmentationUNet

from ..core import manifest
from ..core.imageio import write_pickle_atomic
from ..core.preprocess import DEFAULT_TARGET_SPACING
from ..core.three_stage import WEIGHT_FILES, ThreeStagePipeline
from ..core.weights import save_weights, torch_save_atomic
from .dense import CLASS_WEIGHTS
from .samples import CROP, Crop, case_pool, draw_batch
from .schedules import Schedule

log = logging.getLogger("valdocmb.train")


# -- sample pools ---------------------------------------------------------------------------------------------------
def _pool_job(args):
    subject, scan, label, seed, cache, target_spacing, init_dir, device = args
    path = cache / f"{subject}.pkl" if cache else None
    if path and path.is_file():
        return pickle.loads(path.read_bytes())
    miner = None
    if init_dir is not None:  # the given weights' false positives on this scan (one thread: workers run side by side)
        torch.set_num_threads(1)
        miner = ThreeStagePipeline.from_weights(init_dir, device, lesion_rule=False, precision="auto")
    start = time.perf_counter()
    crops = case_pool(subject, scan, label, np.random.default_rng(seed), target_spacing=target_spacing, miner=miner)
    if miner is not None:
        log.info("pool: %s, %d false positive(s) of the given weights mined, %.0f s", subject,
                 sum(c.kind == "mined" for c in crops), time.perf_counter() - start)
    if path:
        write_pickle_atomic(crops, path)
    return crops


def _case_seed(seed: int, subject: str) -> int:
    """A subject's own random stream: from its whole name (sub-ABC and sub-XYZ differ), stable across runs."""
    name = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "little")
    return int(np.random.SeedSequence([seed, name]).generate_state(1)[0])


def pool_cache(work: Path, seed: int, target_spacing, init_version: str | None = None) -> Path:
    """The pool cache of one seed and processing spacing (crops made at another spacing are never reused), and of
    the given weights whose false positives were mined (fine-tuning)."""
    name = "pool_seed{}_{}mm".format(seed, "x".join(f"{v:g}" for v in target_spacing))
    return work / (name + (f"_mined-{init_version}" if init_version else ""))


def build_pools(cases, seed: int, workers: int, cache: Path | None = None,
                target_spacing=DEFAULT_TARGET_SPACING, init_dir: Path | None = None, device="cpu") -> list[Crop]:
    """Every case's crops on the `target_spacing` grid; each case's pool is cached in `cache` (one file per
    subject) and reused. With `init_dir`, each pool also holds the false positives those weights make on the
    whole scan ("mined" crops), found on `device`."""
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    device = str(device)
    jobs = [(s, scan, lab, _case_seed(seed, s), cache, tuple(target_spacing), init_dir, device)
            for s, scan, lab in cases]
    crops, start = [], time.perf_counter()
    # spawned, never forked: a forked child cannot use CUDA, and one forked after torch's thread pool ran can hang
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for i, case_crops in enumerate(pool.map(_pool_job, jobs), 1):
            crops.extend(case_crops)
            if i % 10 == 0 or i == len(jobs):
                log.info("pool: %d/%d cases, %d crops, %.0f s", i, len(jobs), len(crops), time.perf_counter() - start)
    return crops


def by_kind(crops: list[Crop]) -> dict[str, list[Crop]]:
    pools: dict[str, list[Crop]] = {}
    for crop in crops:
        pools.setdefault(crop.kind, []).append(crop)
    return pools


# -- losses and loops -----------------------------------------------------------------------------------------------
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice of the CMB class over the whole batch (patches without a lesion still count as background)."""
    prob = torch.softmax(logits, 1)[:, 1]
    target = target.float()
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + eps) / (prob.sum() + target.sum() + eps)


def _checkpoint(path: Path, net, optimizer, iteration: int, rng, history) -> None:
    torch_save_atomic({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                       "rng": rng.bit_generator.state, "history": history}, path)


def networks(pipeline) -> dict:
    """A three-stage pipeline's networks by stage name, as `train_all(init=...)` takes them."""
    return {"screening": pipeline.screening, "discrimination": pipeline.discrimination,
            "segmentation": pipeline.segmentation}


def carried_thresholds(pipeline) -> dict[str, float]:
    """The screening and discrimination thresholds networks fine-tuned from `pipeline` keep. Fine-tuning starts from
    its networks at a tenth of their learning rate, so the scores keep their scale; streamed weights carry thresholds
    chosen for them (the first full run's screening: 0.048, against the default 0.1), which the defaults would
    silently replace."""
    return {"screening_threshold": pipeline.config.screening_threshold,
            "discrimination_threshold": pipeline.config.discrimination_threshold}


def early_layers(net: nn.Module) -> list[nn.Module]:
    """The first two convolution blocks of a network (what `--freeze-early` keeps as given): they see only local
    texture; the layers above decide what a lesion is."""
    if isinstance(net, (ScreeningFCN, DiscriminationCNN)):
        return list(net.features[:2])
    if isinstance(net, SegmentationUNet):
        return [net.encoders[0]]
    raise TypeError(f"no early layers known for {type(net).__name__}")


def run_stage(name: str, net: nn.Module, pools, proportions, patch_size, iterations: int, samples: int,
              schedule: Schedule, device, work: Path, seed: int, segmentation: bool = False,
              frozen: Sequence[nn.Module] = ()) -> list[dict]:
    """Train one stage with resumable per-iteration checkpoints; returns the per-iteration history. `frozen`
    modules keep their parameters and batch-norm statistics."""
    net.to(device)
    for module in frozen:
        module.requires_grad_(False)
    trainable = [parameter for parameter in net.parameters() if parameter.requires_grad]
    scale = schedule.learning_rate_scale
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if segmentation:
        optimizer = torch.optim.Adam(trainable, lr=1e-3 * scale)
        loss_fn = soft_dice_loss
    else:
        optimizer = torch.optim.SGD(trainable, lr=1e-2 * scale, momentum=0.99, nesterov=True)
        weights = torch.tensor(CLASS_WEIGHTS, device=device)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(logits, target, weight=weights)
    base_lr = optimizer.param_groups[0]["lr"]
    batch_size = schedule.segmentation_batch_size if segmentation else schedule.batch_size
    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{name}.ckpt"
    start, history = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        start, history = state["iteration"], state["history"]
        log.info("%s: resuming at iteration %d/%d", name, start, iterations)
    for iteration in range(start, iterations):
        t0 = time.perf_counter()
        if not segmentation:
            for group in optimizer.param_groups:
                group["lr"] = base_lr * (1 - iteration / iterations) ** 0.9
        volumes, classes, labels = draw_batch(pools, proportions, samples, patch_size, rng)
        net.train()
        for module in frozen:
            module.eval()
        order = rng.permutation(samples)
        losses, correct = [], 0
        for b in range(0, samples, batch_size):
            idx = order[b:b + batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two samples
            x = torch.from_numpy(volumes[idx]).to(device)
            logits = net(x)
            if segmentation:
                loss = loss_fn(logits, torch.from_numpy(labels[idx]).to(device))
            else:
                logits = logits.reshape(len(idx), 2)
                target = torch.from_numpy(classes[idx]).to(device)
                loss = loss_fn(logits, target)
                correct += int((logits.argmax(1) == target).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        entry = {"iteration": iteration + 1, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                 "seconds": round(time.perf_counter() - t0, 2)}
        if not segmentation:
            entry["accuracy"] = correct / samples
        history.append(entry)
        log.info("%s %3d/%d  loss %.4f%s  lr %.2e  %.1f s", name, iteration + 1, iterations, entry["loss"],
                 f"  acc {entry['accuracy']:.3f}" if "accuracy" in entry else "", entry["lr"], entry["seconds"])
        _checkpoint(ckpt, net, optimizer, iteration + 1, rng, history)
    return history


@torch.inference_mode()
def mine_false_positives(screening: ScreeningFCN, crops: list[Crop], threshold: float, device) -> list[Crop]:
    """Crops (mimic or random negative) whose centre region the screening model scores >= threshold."""
    screening.eval()
    region = np.array(ScreeningFCN.patch_size) + 4          # scores at a 3x3x3 neighbourhood, stride 2
    start = (np.array(CROP) - region) // 2
    sl = tuple(slice(s, s + n) for s, n in zip(start, region))
    mined: list[Crop] = []
    for b in range(0, len(crops), 128):
        batch = crops[b:b + 128]
        x = torch.from_numpy(np.stack([c.volume[sl].astype(np.float32) for c in batch]))[:, None].to(device)
        scores = torch.softmax(screening(x), 1)[:, 1].amax(dim=(1, 2, 3)).cpu().numpy()
        mined.extend(Crop(c.volume, c.label, "mined", c.case, {**c.meta, "score": float(s)})
                     for c, s in zip(batch, scores) if s >= threshold)
    return mined


def train_all(crops: list[Crop], schedule: Schedule, device, work: Path, seed: int, init: dict | None = None,
              freeze_early: bool = False) -> tuple[dict, dict]:
    """All three stages on a pool; returns (trained networks, training record).

    `init`: networks to start from ({"screening", "discrimination", "segmentation"}, e.g. the shipped weights),
    copied, never changed in place. Their screening network replaces the initial one for mining, and the pool's
    "mined" crops (false positives the given weights made on whole training scans) join the mined ones.
    `freeze_early`: the first two convolution blocks of each given network keep their weights."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pools = by_kind(crops)
    log.info("pool: %s", {k: len(v) for k, v in pools.items()})
    if not pools.get("positive"):
        raise SystemExit("no positive sample (no microbleed label) in the training data")
    record: dict = {"pool": {k: len(v) for k, v in pools.items()}}

    def start(name: str, fresh: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        if init is None:
            return fresh, []
        net = copy.deepcopy(init[name]).to(device)  # mining below uses it before run_stage moves it
        return net, early_layers(net) if freeze_early else []

    screening, frozen = start("screening", ScreeningFCN())
    if init is None:
        record["initial_screening"] = run_stage(
            "screening_initial", screening, pools, {"positive": 1, "negative": 2, "mimic": 1},
            ScreeningFCN.patch_size, schedule.initial_iterations, schedule.initial_samples, schedule, device, work,
            seed)
    from_scans = pools.get("mined", [])
    candidates = pools.get("mimic", []) + pools.get("negative", [])
    mined = from_scans + mine_false_positives(screening, candidates, schedule.mining_threshold, device)
    log.info("mined %d false positives: %d of %d mimic/negative crops, %d from whole scans", len(mined),
             len(mined) - len(from_scans), len(candidates), len(from_scans))
    if len(mined) < 20:  # a strong initial model leaves few: the mimic crops are the hard negatives then
        mined += [Crop(c.volume, c.label, "mined", c.case, c.meta) for c in pools.get("mimic", [])]
    pools["mined"] = mined
    record["mined_false_positives"] = len(mined)

    record["screening"] = run_stage(
        "screening", screening, pools, {"positive": 1, "negative": 2, "mined": 1}, ScreeningFCN.patch_size,
        schedule.screening_iterations, schedule.screening_samples, schedule, device, work, seed + 1, frozen=frozen)
    discrimination, frozen = start("discrimination", DiscriminationCNN())
    record["discrimination"] = run_stage(
        "discrimination", discrimination, pools, {"positive": 1, "mined": 1}, DiscriminationCNN.patch_size,
        schedule.discrimination_iterations, schedule.discrimination_samples, schedule, device, work, seed + 2,
        frozen=frozen)
    segmentation, frozen = start("segmentation", SegmentationUNet())
    record["segmentation"] = run_stage(
        "segmentation", segmentation, pools, {"positive": 3, "mined": 1}, SegmentationUNet.patch_size,
        schedule.segmentation_iterations, schedule.segmentation_samples, schedule, device, work, seed + 3,
        segmentation=True, frozen=frozen)
    nets = {"screening": screening, "discrimination": discrimination, "segmentation": segmentation}
    return {k: v.cpu().eval() for k, v in nets.items()}, record


def write_weights(nets: dict, out: Path, record: dict, meta: dict) -> dict:
    """Inference weights and their manifest entries (merged into an existing MANIFEST.json). `meta["target_spacing"]`
    is the processing spacing the crops were made at: it goes into every weight file, and inference resamples to
    it."""
    entries = {}
    for name, net in nets.items():
        relative = WEIGHT_FILES[name]
        stored = {"target_spacing": list(meta["target_spacing"])}
        threshold = f"{name}_threshold"
        if threshold in record:  # streamed training chose one for these weights (screening, discrimination)
            stored[threshold] = record[threshold]["threshold"]
        digest = save_weights(net, out / relative, stored)
        entries[relative] = {
            "sha256": digest, "bytes": (out / relative).stat().st_size, "architecture": type(net).__name__,
            "method": "three-stage", "stage": name, "training": dict(meta),
            "final_iteration": record[name][-1] if record.get(name) else None,
        }
        if "curves" in record:  # streamed training: the learning curve and the validation of the kept state
            curve = record["curves"][name]
            entries[relative]["learning_curve"] = curve
            entries[relative]["validation"] = next((e["validation"] for e in curve["validation"]
                                                     if e["step"] == curve["kept_step"]), None)

    def change(content: dict) -> None:
        previous = {relative: dict(entry) for relative, entry in content["files"].items()}
        content["files"].update(entries)
        content["three_stage_training"] = {key: record[key] for key in ("pool", "mined_false_positives", "stream",
                                                                        "screening_threshold",
                                                                        "discrimination_threshold") if key in record}
        stale = manifest.drop_stale(content, previous, WEIGHT_FILES.values())
        if stale:
            log.warning("%s: dropped %s, measured on the previous weights; measure and choose again with "
                        "`valdocmb-stagewise --cache DIR --record` and `valdocmb-tune --cache DIR --record`",
                        manifest.manifest_path(out), ", ".join(stale))

    return manifest.update(out, change)
