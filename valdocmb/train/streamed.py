"""Training the three stages from scratch on a stream of simulated regions (`valdocmb-train` without --data).

Per stage, a rolling buffer of regions (`RegionStream`): every step takes `refresh` new regions, drops the oldest,
and draws its batch from the buffer with fresh augmentation, so each region is seen a few times and the run sees
thousands of distinct simulated scans.
1. Screening: dense (`dense.dense_screening_loss`) on 48x64x64 crops, every patch position labelled.
2. Discrimination: sites of each region: its microbleeds (positives); the trained screening network's highest
   false positives in it (mined during training, the paper's "mimics the first stage lets through"); the simulator's
   veins (ends, bends, crossings), calcifications and flow voids; random brain. Shared C1-C2 over each site's region,
   `discrimination_shifts` shifted windows per site (`dense.shared_discrimination_logits`).
3. Segmentation: the U-Net on 24x32x32 patches around microbleeds (3) and hard negatives (1), soft Dice.
Screening and discrimination: SGD with Nesterov momentum 0.99, poly decay; the U-Net: Adam (as the pool path).
A stage validates every `validate_every` steps on a fixed simulated validation set (its own stream, never trained
on), keeps its best state by the mean of its last `SELECTION_WINDOW` validation figures, and stops after `patience`
validations without improvement of that mean (once `stop_after` of its budget is done) or at its step budget.
Everything checkpoints under the work folder (model, optimizer, step, stream position, random state, history, best
state): the same command continues a stopped run, regenerating the buffer from the stream (deterministic).
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.models.segmentation import SegmentationUNet

from ..core import openvino_runtime
from ..core.imageio import remove_temporary_files, write_pickle_atomic
from ..core.patches import extract_patches
from ..core.preprocess import DEFAULT_TARGET_SPACING
from ..core.weights import torch_save_atomic
from . import dense
from .schedules import StreamSchedule
from .stream import RegionStream, StreamedRegion
from .three_stage import soft_dice_loss

log = logging.getLogger("valdocmb.train")

MINED_PER_REGION = 8          # the screening network's highest false positives kept per region
MINING_FLOOR = 0.05           # ... at least this probable
LESION_ZONE = 6               # voxels around a microbleed where no negative site is taken
CHECKPOINT_EVERY = 10         # steps between checkpoints (and at every validation's decision to stop)
# validations averaged for keeping a stage's state and for stopping it: one check on the validation regions is
# noisy (the discrimination loss moved between 0.12 and 0.30 at a steady level, and the single best check, an early
# lucky one, would have been kept over 8,000 later steps)
SELECTION_WINDOW = 3
FROC_FALSE_PEAKS = (0.5, 1, 2, 4)   # false-positive peaks per validation region the screening figure averages over
# sensitivities at which the discrimination figure counts the negatives kept: its kept state is chosen by ranking,
# not by the loss, whose swings came from a few microbleeds' probabilities (at equal sensitivity, a state kept by
# loss let through twice the mimics of one 2,400 steps later)
KEPT_AT_RECALLS = (0.9, 0.95, 0.98)
# the discrimination threshold stored with the weights keeps this share of the validation microbleeds, and is never
# above the paper's 0.5 (a lesion rule chosen on a tuning set may still ask more)
DISCRIMINATION_RECALL = 0.98


# stream seeds: one per stage and one for validation, so no validation region is ever trained on
STAGES = ("screening", "discrimination", "segmentation")


def stream_seed(seed: int, stage: str) -> int:
    return seed * 100 + (STAGES.index(stage) if stage in STAGES else 99)


# -- sites -------------------------------------------------------------------------------------------------------
def lesion_centres(label: np.ndarray) -> list[tuple]:
    components, n = ndimage.label(label, np.ones((3, 3, 3)))
    if not n:
        return []
    return [tuple(int(v) for v in np.round(c)) for c in ndimage.center_of_mass(label, components, range(1, n + 1))]


@torch.inference_mode()
def screening_probabilities(net: ScreeningFCN, volume: np.ndarray, device, cast) -> np.ndarray:
    """CMB probability at every even voxel of a region (score (i, j, k) <-> patch centred at (2i, 2j, 2k)), the
    FCN over the region zero-padded by half a patch in front (as inference pads a scan)."""
    x = torch.from_numpy(_padded(volume))[None, None].to(device)
    net.eval()
    with cast():
        logits = net(x)[0]
    return _probabilities(logits, volume.shape)


class ScreeningScorer:
    """`screening_probabilities` of a trained, fixed screening network, as discrimination and segmentation call it on
    every new training region to mine its false positives. On a CPU with OpenVINO it runs as inference does (the
    network rebuilt in OpenVINO, compiled once per region shape, in the training's precision): the same
    probabilities to about 1e-4 in bfloat16, at about twice torch's speed, which matters because mining costs about a
    third of a discrimination step and more of a U-Net step. Elsewhere (CUDA, no OpenVINO) it is torch. The
    validation regions' sites are mined once with torch (`screening_probabilities`), so every run's figures compare."""

    def __init__(self, net: ScreeningFCN, device, cast, precision: str):
        self.net, self.device, self.cast, self.precision = net, device, cast, precision
        self.openvino = torch.device(device).type == "cpu" and openvino_runtime.available()
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        if not self.openvino:
            return screening_probabilities(self.net, volume, self.device, self.cast)
        padded = _padded(volume)
        run = self._compiled.get(padded.shape)
        if run is None:
            self.net.eval()
            run = self._compiled[padded.shape] = openvino_runtime.compile_stack(
                list(self.net.features), 1, self.precision, torch.get_num_threads(), spatial=padded.shape)
        return _probabilities(run(torch.from_numpy(padded)[None, None])[0], volume.shape)


def _padded(volume: np.ndarray) -> np.ndarray:
    """A region zero-padded by half a screening patch in front (as inference pads a scan) and the rest behind."""
    before = np.array(ScreeningFCN.patch_size) // 2
    after = np.array(ScreeningFCN.patch_size) - before
    return np.pad(volume.astype(np.float32), [(b, a) for b, a in zip(before, after)])


def _probabilities(logits: torch.Tensor, shape) -> np.ndarray:
    prob = torch.softmax(logits.float(), 0)[1].cpu().numpy()
    m = -(-np.array(shape) // ScreeningFCN.stride)
    return prob[:m[0], :m[1], :m[2]]


def mine(prob: np.ndarray, foreground: np.ndarray, zone: np.ndarray, count: int) -> list[tuple]:
    """Up to `count` local maxima of the screening probability outside `zone`, highest first, >= MINING_FLOOR."""
    stride = ScreeningFCN.stride
    peaks = (prob == ndimage.maximum_filter(prob, size=5)) & (prob >= MINING_FLOOR)
    peaks &= ~zone[::stride, ::stride, ::stride] & foreground[::stride, ::stride, ::stride]
    found = np.argwhere(peaks)
    order = np.argsort(-prob[tuple(found.T)], kind="stable")[:count]
    return [tuple(int(v) for v in found[i] * stride) for i in order]


def region_rng(region: StreamedRegion) -> np.random.Generator:
    """The random draws of one region's sites: a function of the region alone, so a resumed run draws the same."""
    return np.random.default_rng([region.index, 17])


def region_sites(region: StreamedRegion, rng: np.random.Generator, score=None) -> dict:
    """Discrimination and segmentation sites of a region by kind: positive, mined, mimic, random. `score`: the
    screening probabilities of a volume (`screening_probabilities`, `ScreeningScorer`); without it, nothing is
    mined."""
    zone = (ndimage.binary_dilation(region.label > 0, iterations=LESION_ZONE) if region.label.any()
            else np.zeros(region.label.shape, bool))
    sites = {"positive": lesion_centres(region.label),
             "mimic": [c for c, _ in region.sites if not zone[c]], "mined": [], "random": []}
    brain = np.argwhere(region.foreground & ~zone)
    if len(brain):
        sites["random"] = [tuple(int(v) for v in brain[i]) for i in rng.choice(len(brain), min(4, len(brain)),
                                                                             replace=False)]
    if score is not None:
        prob = score(region.volume)
        sites["mined"] = mine(prob, region.foreground, zone, MINED_PER_REGION)
    return sites


# -- batches -----------------------------------------------------------------------------------------------------
def _as_batch(arrays, device) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays).astype(np.float32))[:, None].to(device)


def screening_batch(regions: list[StreamedRegion], rng, device, augment: bool = True):
    """(crops (N, 1, 48, 64, 64), targets) cut from the regions at random places, turned and flipped."""
    crop = np.array(dense.SCREEN_CROP)
    volumes, labels, foregrounds = [], [], []
    for region in regions:
        shape = np.array(region.volume.shape)
        # the whole in-plane extent is turned, then a crop is cut from its middle
        z0 = int(rng.integers(0, shape[0] - crop[0] + 1)) if augment else (shape[0] - crop[0]) // 2
        sl = (slice(z0, z0 + crop[0]), slice(None), slice(None))
        volumes.append(region.volume[sl])
        labels.append(region.label[sl])
        foregrounds.append(region.foreground[sl])
    x = _as_batch(volumes, device)
    masks = torch.cat([_as_batch(labels, device), _as_batch(foregrounds, device)], 1)
    if augment:
        x, masks = dense.rotate_and_flip(x, masks, rng)
    free = np.array(x.shape[3:]) - crop[1:]
    out_x, out_masks = [], []
    for n in range(len(regions)):
        y0, x0 = ((rng.integers(0, f + 1) for f in free) if augment else (f // 2 for f in free))
        out_x.append(x[n, :, :, y0:y0 + crop[1], x0:x0 + crop[2]])
        out_masks.append(masks[n, :, :, y0:y0 + crop[1], x0:x0 + crop[2]])
    x, masks = torch.stack(out_x), torch.stack(out_masks)
    label, foreground = masks[:, 0].cpu().numpy() > 0.5, masks[:, 1].cpu().numpy() > 0.5
    if augment:
        x = dense.intensity_jitter(x, masks[:, 1:2], rng)
    target = torch.from_numpy(np.stack([dense.screening_targets(lab, fg) for lab, fg in zip(label, foreground)]))
    return x, target.to(device)


NEGATIVE_MIX = {"mined": 0.5, "mimic": 0.3, "random": 0.2}
RANDOM = {"random": 1.0}               # the hard-negative ablation's negatives (StreamSchedule.hard_negative_sites=0)


def draw_sites(buffer_sites: list[tuple[StreamedRegion, dict]], count: int, positive_share: float, rng,
               negative_kinds=NEGATIVE_MIX) -> list[tuple[StreamedRegion, tuple, int]]:
    """`count` (region, centre, class) draws: `positive_share` microbleeds, the rest negatives of the kinds in
    their proportions (kinds with no site in the buffer give their share to the others)."""
    pools = {"positive": [(r, c) for r, s in buffer_sites for c in s["positive"]]}
    for kind in negative_kinds:
        pools[kind] = [(r, c) for r, s in buffer_sites for c in s[kind]]
    kinds = [k for k in negative_kinds if pools[k]]
    weights = np.array([negative_kinds[k] for k in kinds], float)
    draws = []
    for _ in range(count):
        if pools["positive"] and (rng.random() < positive_share or not kinds):
            region, centre = pools["positive"][rng.integers(len(pools["positive"]))]
            draws.append((region, centre, 1))
        elif kinds:
            kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
            region, centre = pools[kind][rng.integers(len(pools[kind]))]
            draws.append((region, centre, 0))
    return draws


def site_patches(draws, size, margin, rng, device, augment: bool = True, shift: int = 0):
    """Volumes and labels of `size` (z, y, x) around each drawn centre (moved by up to `shift` voxels), turned
    and flipped; cut from a `margin` voxels larger in-plane patch so the turn leaves no empty corners."""
    big = np.array(size) + np.array([0, 2 * margin, 2 * margin])
    centres = []
    for _, centre, _ in draws:
        move = rng.integers(-shift, shift + 1, 3) if shift and augment else np.zeros(3, int)
        centres.append(np.asarray(centre) + move)
    volumes = [extract_patches(r.volume, [c], big)[0] for (r, _, _), c in zip(draws, centres)]
    labels = [extract_patches(r.label, [c], big)[0] for (r, _, _), c in zip(draws, centres)]
    foregrounds = [extract_patches(r.foreground.astype(np.float32), [c], big)[0]
                   for (r, _, _), c in zip(draws, centres)]
    x = _as_batch(volumes, device)
    masks = torch.cat([_as_batch(labels, device), _as_batch(foregrounds, device)], 1)
    if augment:
        x, masks = dense.rotate_and_flip(x, masks, rng)
        x = dense.intensity_jitter(x, (masks[:, 1:2] > 0.5).float(), rng)
    sl = (slice(None), slice(None), slice(None), slice(margin, margin + size[1]), slice(margin, margin + size[2]))
    return x[sl].contiguous(), (masks[:, 0][sl[:1] + sl[2:]] > 0.5).long()


# -- one stage ---------------------------------------------------------------------------------------------------
class Stage:
    """What differs between the three stages: the network, its optimizer, one training step, validation, and the
    validation figure its kept state is chosen by (`selection`; lower is better unless `higher_is_better`)."""

    name: str
    items: str                        # what a step counts (positions, windows, patches)
    net: nn.Module
    selection, higher_is_better = "loss", False
    kept_step: int | None = None      # set when the stage ends: the step whose validated state is kept

    def optimizer(self, scale: float):
        return torch.optim.SGD(self.net.parameters(), lr=1e-2 * scale, momentum=0.99, nesterov=True)

    def rate(self, base: float, step: int, total: int) -> float:
        return dense.poly_rate(base, step, total)

    def prepare(self, region: StreamedRegion):
        return region

    def step(self, buffer, rng) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def validate(self, validation) -> dict:
        raise NotImplementedError


def _checkpoint(path: Path, state: dict) -> None:
    torch_save_atomic(state, path)


def run_stage(stage: Stage, steps: int, schedule: StreamSchedule, seed: int, work: Path, device, workers: int,
              spacing, validation, cast) -> list[dict]:
    """Train one stage on its stream; returns its history (training and validation entries)."""
    net = stage.net.to(device)
    if torch.device(device).type == "cpu":   # oneDNN's channels-last 3D kernels: a U-Net step 15 % faster
        net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs omit it
    optimizer = stage.optimizer(schedule.learning_rate_scale)
    base_rate = optimizer.param_groups[0]["lr"]
    rng = np.random.default_rng(stream_seed(seed, stage.name))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{stage.name}.ckpt"
    state: dict[str, Any] = {"step": 0, "stream_position": 0, "history": [], "best": None, "stale": 0,
                             "done": False, "cooldown": None}
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        rng.bit_generator.state = saved["rng"]
        state = {k: saved.get(k, default) for k, default in state.items()}
        log.info("%s: resuming at step %d/%d (stream position %d)", stage.name, state["step"], steps,
                 state["stream_position"])
    if state["done"] or state["step"] >= steps:
        _finish(stage, state)
        return state["history"]
    start = max(0, state["stream_position"] - schedule.buffer)
    with RegionStream(stream_seed(seed, stage.name), start, workers, ahead=2,
                      target_spacing=spacing, profile_mix=schedule.profile_mix()) as stream:
        buffer = [stage.prepare(r) for r in stream.take(schedule.buffer if start == 0 else
                                                                    state["stream_position"] - start)]
        started, first_step = time.perf_counter(), state["step"]
        while state["step"] < _end_step(state, steps):
            t0 = time.perf_counter()
            if state["step"] > 0 or start > 0:
                buffer = buffer[schedule.refresh:] + [stage.prepare(r)
                                                      for r in stream.take(schedule.refresh)]
            t_data = time.perf_counter() - t0
            cooldown, end = state["cooldown"], _end_step(state, steps)
            for group in optimizer.param_groups:
                group["lr"] = (stage.rate(base_rate, state["step"], steps) if cooldown is None else
                               cooldown["rate"] * (cooldown["to_step"] - state["step"])
                               / (cooldown["to_step"] - cooldown["from_step"]))
            net.train()
            with cast():
                loss, items = stage.step(buffer, rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            seconds = time.perf_counter() - t0
            entry = {"step": state["step"], "loss": round(float(loss.detach()), 5),
                     "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
                     "waiting_s": round(t_data, 3), "items": items, "items_per_s": round(items / seconds, 1),
                     "regions_seen": stream.position}
            state["history"].append(entry)
            if state["step"] % 10 == 0 or state["step"] == 1:
                elapsed = time.perf_counter() - started
                per_step = elapsed / (state["step"] - first_step)
                earliest = end if cooldown else (schedule.stop_after + schedule.cooldown) * steps
                log.info("%s %5d/%d  loss %.4f  %.0f %s/s  %.2f s/step (%.2f waiting)  %d regions  %.0f min  "
                         "(ends in %.1f-%.1f h)", stage.name, state["step"], steps, entry["loss"],
                         entry["items_per_s"], stage.items, seconds, t_data, stream.position, elapsed / 60,
                         max(0.0, min(earliest, end) - state["step"]) * per_step / 3600,
                         (end - state["step"]) * per_step / 3600)
            last = state["step"] == end
            if state["step"] % schedule.validate_every == 0 or last:
                result = {"step": state["step"], "validation": stage.validate(validation)}
                state["history"].append(result)
                since = cooldown["from_step"] if cooldown else 0
                score = selection_score([e for e in state["history"] if e["step"] > since], stage.selection)
                metric = f"{stage.selection}, mean of {SELECTION_WINDOW} checks"
                best = state["best"]
                if best is not None and best.get("metric") != metric:
                    best = None  # a checkpoint that chose by another figure: this validation starts afresh
                # a cool-down's state competes once its own checks fill the window (or at its end)
                settled = (cooldown is None or last
                           or state["step"] - since >= SELECTION_WINDOW * schedule.validate_every)
                if best is None or settled and (score > best["score"] if stage.higher_is_better
                                                else score < best["score"]):
                    state["best"] = {"metric": metric, "score": score, "step": state["step"],
                                     "model": copy.deepcopy(net.state_dict())}
                    state["stale"] = 0
                else:
                    state["stale"] += 1
                log.info("%s validation at step %d: %s%s", stage.name, state["step"],
                         ", ".join(f"{k} {v:.4g}" for k, v in result["validation"].items()),
                         "  (best)" if state["stale"] == 0 else f"  ({state['stale']} without improvement)")
                if (cooldown is None and state["stale"] >= schedule.patience
                        and state["step"] >= schedule.stop_after * steps):
                    length = min(int(schedule.cooldown * steps), steps - state["step"])
                    if length >= schedule.validate_every:
                        # the learning rate is still high where validation stalls: from the kept state, a fresh
                        # optimizer takes it linearly to zero over `length` steps, still validated and kept by the
                        # same figure
                        log.info("%s: validation has not improved for %d checks; cooling down from step %d's state "
                                 "over %d steps (learning rate %.3g -> 0)", stage.name, state["stale"],
                                 state["best"]["step"], length, optimizer.param_groups[0]["lr"])
                        state["cooldown"] = {"from_step": state["step"], "to_step": state["step"] + length,
                                             "rate": optimizer.param_groups[0]["lr"],
                                             "from_state": state["best"]["step"]}
                        net.load_state_dict(state["best"]["model"])
                        optimizer = stage.optimizer(schedule.learning_rate_scale)
                    else:
                        log.info("%s: validation has not improved for %d checks; stopping at step %d, keeping "
                                 "step %d", stage.name, state["stale"], state["step"], state["best"]["step"])
                        state["done"] = True
            state["stream_position"] = stream.position
            if state["done"] or last or state["cooldown"] is not cooldown or state["step"] % CHECKPOINT_EVERY == 0:
                _checkpoint(ckpt, {**state, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                   "rng": rng.bit_generator.state})
            if state["done"]:
                break
    state["done"] = True
    _checkpoint(ckpt, {**state, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                       "rng": rng.bit_generator.state})
    _finish(stage, state)
    return state["history"]


def _end_step(state: dict, steps: int) -> int:
    """Where a stage's training ends: its budget, or the end of its cool-down once one began."""
    return state["cooldown"]["to_step"] if state["cooldown"] else steps


def selection_score(history: list[dict], selection: str) -> float:
    """The figure a stage is kept and stopped by: its validation figure `selection` averaged over the last
    SELECTION_WINDOW validations in `history` (fewer at the start)."""
    figures = [entry["validation"][selection] for entry in history
               if selection in entry.get("validation", {})]   # checks from before a figure existed are skipped
    return float(np.mean(figures[-SELECTION_WINDOW:]))


def _finish(stage: Stage, state: dict) -> None:
    """The stage's network in its kept (best validated) state; `stage.kept_step` says which step that was."""
    stage.kept_step = state["best"]["step"] if state["best"] is not None else None
    if state["best"] is not None:
        stage.net.load_state_dict(state["best"]["model"])
    stage.net.to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]


# -- the three stages ----------------------------------------------------------------------------------------------
class ScreeningStage(Stage):
    name, items = "screening", "positions"
    selection, higher_is_better = "froc", True

    def __init__(self, net, schedule, device, cast):
        self.net, self.schedule, self.device, self.cast = net, schedule, device, cast

    def step(self, buffer, rng):
        chosen = [buffer[i] for i in rng.choice(len(buffer), self.schedule.screening_crops,
                                                replace=len(buffer) < self.schedule.screening_crops)]
        x, target = screening_batch(chosen, rng, self.device)
        loss, _ = dense.dense_screening_loss(self.net, x, target, self.schedule.hard_negatives)
        return loss, dense.count_positions(target)

    @torch.inference_mode()
    def validate(self, validation) -> dict:
        return screening_metrics(self.net, validation, self.device, self.cast)


def screening_outputs(net, validation, device, cast) -> tuple[list[float], list[float], list[float]]:
    """On the centre crop of each validation region: its class-balanced loss, the best probability on each of its
    microbleeds, and the probability of every false-positive peak (local maxima over +-2 score voxels, as
    inference's non-maximum suppression keeps them)."""
    net.eval()
    losses, best, false = [], [], []
    first = dense.patch_centre_offset()
    with torch.inference_mode():
        for region in validation:
            x, target = screening_batch([region], None, device, augment=False)
            with cast():
                logits = net(x)
            losses.append(float(dense.position_loss(logits, target, dense.class_balanced_weights(target))))
            prob = torch.softmax(logits.float(), 1)[0, 1].cpu().numpy()
            t = target[0].cpu().numpy()
            # the crop screening_batch cuts without augmentation: the middle of the region
            z0, y0, x0 = ((n - c) // 2 for n, c in zip(region.volume.shape, dense.SCREEN_CROP))
            label = region.label[z0:z0 + dense.SCREEN_CROP[0], y0:y0 + dense.SCREEN_CROP[1],
                                 x0:x0 + dense.SCREEN_CROP[2]]
            components, _ = ndimage.label(label, np.ones((3, 3, 3)))
            ids = components[tuple(slice(f, f + 2 * (s - 1) + 1, 2) for f, s in zip(first, prob.shape))]
            best += [float(prob[(t == 1) & (ids == i)].max()) for i in set(np.unique(ids[t == 1])) - {0}]
            peaks = prob == ndimage.maximum_filter(prob, size=5)
            false += prob[peaks & (t == 0)].tolist()
    return losses, best, false


def screening_metrics(net, validation, device, cast, thresholds=(0.1, 0.5)) -> dict:
    """Class-balanced loss, lesion recall and false-positive peaks per region at each threshold, and the recall at
    the threshold that leaves one false-positive peak per region (comparable whatever the calibration)."""
    losses, best, false = screening_outputs(net, validation, device, cast)
    regions = max(1, len(validation))
    out = {"loss": float(np.mean(losses)), "lesions": len(best)}
    for th in thresholds:
        out[f"recall@{th}"] = float(np.mean([b >= th for b in best])) if best else 0.0
        out[f"fp_per_region@{th}"] = sum(f >= th for f in false) / regions
    ranked = sorted(false, reverse=True)

    def recall_at(false_peaks_per_region: float) -> float:
        allowed = int(false_peaks_per_region * regions)
        threshold = ranked[allowed - 1] if 0 < allowed <= len(ranked) else 0.0
        return float(np.mean([b > threshold for b in best])) if best else 0.0

    out["recall@1fp"] = recall_at(1)
    # the mean recall at 0.5, 1, 2 and 4 false peaks per region: what a stage's kept state is chosen by (a detector's
    # figure, and steadier than one operating point)
    out["froc"] = float(np.mean([recall_at(f) for f in FROC_FALSE_PEAKS]))
    return out


def choose_screening_threshold(net, validation, device, cast, false_peaks_per_region: float) -> dict:
    """The lowest threshold that leaves at most `false_peaks_per_region` false-positive peaks per validation
    region, and the recall it keeps there."""
    _, best, false = screening_outputs(net, validation, device, cast)
    allowed = int(false_peaks_per_region * len(validation))
    ranked = sorted(false, reverse=True)
    threshold = float(np.nextafter(np.float32(ranked[allowed]), np.float32(1))) if allowed < len(ranked) else 1e-3
    return {"threshold": threshold, "false_peaks_per_region": sum(f >= threshold for f in false) / len(validation),
            "recall": float(np.mean([b >= threshold for b in best])) if best else 0.0,
            "chosen_on": f"{len(validation)} validation regions",
            "target_false_peaks_per_region": false_peaks_per_region}


class DiscriminationStage(Stage):
    name, items = "discrimination", "windows"
    selection = "kept_at_recall"

    def __init__(self, net, score, schedule, device, cast):
        self.net, self.score, self.schedule, self.device, self.cast = net, score, schedule, device, cast

    def prepare(self, region):
        return region, region_sites(region, region_rng(region), self.score)

    def step(self, buffer, rng):
        s = self.schedule
        draws = draw_sites(buffer, s.discrimination_sites, 0.5, rng, NEGATIVE_MIX if s.hard_negative_sites else RANDOM)
        x, _ = site_patches(draws, dense.DISCRIMINATION_REGION, 4, rng, self.device)
        shifts = dense.random_shifts(rng, len(draws), s.discrimination_shifts)
        logits = dense.shared_discrimination_logits(self.net, x, shifts)
        target = torch.tensor([c for _, _, c in draws], device=self.device).repeat_interleave(s.discrimination_shifts)
        weights = torch.tensor(dense.CLASS_WEIGHTS, device=self.device)[target]
        return dense.position_loss(logits, target, weights / weights.sum()), len(target)

    def validate(self, validation) -> dict:
        return discrimination_metrics(self.net, validation, self.device, self.cast)


def discrimination_probabilities(net, validation, device, cast) -> dict[str, list[float]]:
    """The CMB probability of the centre window of every validation site, by kind (positive, mined, mimic,
    random)."""
    net.eval()
    by_kind: dict[str, list[float]] = {}
    with torch.inference_mode():
        for region, sites in validation:
            for kind, centres in sites.items():
                if not centres:
                    continue
                x = torch.from_numpy(extract_patches(region.volume.astype(np.float32), centres,
                                                     DiscriminationCNN.patch_size))[:, None].to(device)
                with cast():
                    prob = torch.softmax(net(x).float(), 1)[:, 1].cpu().numpy()
                by_kind.setdefault(kind, []).extend(prob.tolist())
    return by_kind


def positives_and_negatives(by_kind: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """The microbleeds' probabilities, and those of every negative kind pooled."""
    negatives = [np.asarray(by_kind[kind]) for kind in by_kind if kind != "positive"]
    return np.array(by_kind.get("positive", [])), np.concatenate(negatives or [np.zeros(0)])


def threshold_at_recall(positives: np.ndarray, recall: float) -> float:
    """The highest threshold that keeps at least `recall` of the positives (probability >= threshold)."""
    ranked = np.sort(positives)[::-1]
    return float(ranked[max(1, math.ceil(recall * len(ranked) - 1e-9)) - 1])


def discrimination_metrics(net, validation, device, cast) -> dict:
    """On the centre window of each validation site: loss, sensitivity on the microbleeds and the share of each
    negative kind kept at 0.5, and `kept_at_recall`, the share of all negatives kept at the thresholds that keep
    KEPT_AT_RECALLS of the microbleeds, averaged (threshold-free: what a stage's state is kept by)."""
    by_kind = discrimination_probabilities(net, validation, device, cast)
    positives, negatives = positives_and_negatives(by_kind)
    eps = 1e-6
    loss = -(dense.CLASS_WEIGHTS[1] * np.log(positives + eps).mean() if len(positives) else 0) \
        - (dense.CLASS_WEIGHTS[0] * np.log(1 - negatives + eps).mean() if len(negatives) else 0)
    out = {"loss": float(loss), "sensitivity": float((positives >= 0.5).mean()) if len(positives) else 0.0}
    for kind in ("mined", "mimic", "random"):
        if by_kind.get(kind):
            out[f"{kind}_kept"] = float((np.array(by_kind[kind]) >= 0.5).mean())
    if len(positives) and len(negatives):
        out["kept_at_recall"] = float(np.mean([(negatives >= threshold_at_recall(positives, r)).mean()
                                               for r in KEPT_AT_RECALLS]))
    return out


def choose_discrimination_threshold(net, validation, device, cast, recall: float = DISCRIMINATION_RECALL) -> dict:
    """The threshold stored with the weights: the one that keeps `recall` of the validation microbleeds, or the
    paper's 0.5 where that is lower (a network scoring its microbleeds low gets a lower threshold, never a stricter
    one: out-of-distribution microbleeds score lower than validation ones)."""
    by_kind = discrimination_probabilities(net, validation, device, cast)
    positives, negatives = positives_and_negatives(by_kind)
    threshold = min(0.5, threshold_at_recall(positives, recall)) if len(positives) else 0.5
    return {"threshold": threshold, "recall": float((positives >= threshold).mean()) if len(positives) else 0.0,
            "negatives_kept": float((negatives >= threshold).mean()) if len(negatives) else 0.0,
            "chosen_on": f"{len(positives)} validation microbleeds, {len(negatives)} negatives",
            "target_recall": recall}


class SegmentationStage(Stage):
    name, items = "segmentation", "patches"

    def __init__(self, net, score, schedule, device, cast):
        self.net, self.score, self.schedule, self.device, self.cast = net, score, schedule, device, cast

    def optimizer(self, scale: float):
        return torch.optim.Adam(self.net.parameters(), lr=1e-3 * scale)

    def rate(self, base, step, total):
        return base

    def prepare(self, region):
        return region, region_sites(region, region_rng(region), self.score)

    def step(self, buffer, rng):
        negatives = {"mined": 0.5, "mimic": 0.5} if self.schedule.hard_negative_sites else RANDOM
        draws = draw_sites(buffer, self.schedule.segmentation_batch, 0.75, rng, negatives)
        x, label = site_patches(draws, SegmentationUNet.patch_size, 4, rng, self.device, shift=3)
        return soft_dice_loss(self.net(x), label), len(draws)

    def validate(self, validation) -> dict:
        return segmentation_metrics(self.net, validation, self.device, self.cast)


def segmentation_metrics(net, validation, device, cast) -> dict:
    """On the patches of the validation microbleeds and hard negatives (mined and mimic sites, where a survivor of
    discrimination that is no microbleed puts the U-Net): soft Dice loss over all of them together (as training's
    loss counts its batch; predicted mass on a negative patch only lowers it), Dice at 0.5 over the microbleeds'
    patches, and the voxels at 0.5 per negative patch."""
    net.eval()
    inter = total_pred = total_true = soft_inter = soft_sum = 0.0
    negative_voxels, negatives = 0.0, 0
    with torch.inference_mode():
        for region, sites in validation:
            for kind in ("positive", "mined", "mimic"):
                if not sites.get(kind):
                    continue
                x = torch.from_numpy(extract_patches(region.volume.astype(np.float32), sites[kind],
                                                     SegmentationUNet.patch_size))[:, None].to(device)
                label = extract_patches(region.label, sites[kind], SegmentationUNet.patch_size) > 0.5
                with cast():
                    prob = torch.softmax(net(x).float(), 1)[:, 1].cpu().numpy()
                soft_inter += float(prob[label].sum())
                soft_sum += float(prob.sum() + label.sum())
                if kind == "positive":
                    inter += float((prob >= 0.5)[label].sum())
                    total_pred += float((prob >= 0.5).sum())
                    total_true += float(label.sum())
                else:
                    negative_voxels += float((prob >= 0.5).sum())
                    negatives += len(prob)
    return {"loss": 1 - (2 * soft_inter + 1) / (soft_sum + 1), "dice": 2 * inter / max(1.0, total_pred + total_true),
            "negative_voxels": negative_voxels / max(1, negatives)}


# -- the whole run -----------------------------------------------------------------------------------------------
def validation_regions(work: Path, seed: int, count: int, workers: int, spacing) -> list[StreamedRegion]:
    """The fixed validation regions of this seed (their own stream), cached in the work folder."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"validation_seed{seed}_{count}_{'x'.join(f'{v:g}' for v in spacing)}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    started = time.perf_counter()
    with RegionStream(stream_seed(seed, "validation"), 0, workers, ahead=2 * max(1, workers),
                      target_spacing=spacing) as stream:
        regions = stream.take(count)
    write_pickle_atomic(regions, path)
    log.info("validation: %d regions (%d microbleed voxels) in %.0f s", count, sum(int(r.label.sum()) for r in regions),
             time.perf_counter() - started)
    return regions


def train_streamed(schedule: StreamSchedule, device, work: Path, seed: int, workers: int = 1,
                   spacing=DEFAULT_TARGET_SPACING, precision: str = "auto", init: dict | None = None):
    """All three stages from the stream; returns (networks, record). `init`: networks to start from (copied)."""
    work.mkdir(parents=True, exist_ok=True)
    if removed := remove_temporary_files(work):
        log.info("removed %d partial file(s) a killed run left in %s", removed, work)
    torch.manual_seed(seed)
    cast, precision = dense.autocast(torch.device(device), precision)
    log.info("streamed training: schedule %s, precision %s, device %s, %d simulation worker(s), work %s",
             asdict(schedule), precision, device, workers, work)
    validation = validation_regions(work, seed, schedule.validation_regions, workers, spacing)

    def start(name, fresh):
        return copy.deepcopy(init[name]) if init else fresh

    record: dict = {"precision": precision, "schedule": asdict(schedule)}

    screening = start("screening", ScreeningFCN())
    stages: list[Stage] = [ScreeningStage(screening, schedule, device, cast)]
    record["screening"] = run_stage(stages[0], schedule.screening_steps, schedule, seed, work, device, workers,
                                    spacing, validation, cast)
    record["screening_threshold"] = choose_screening_threshold(screening, validation, device, cast,
                                                               schedule.false_peaks_per_region)
    log.info("screening threshold %.4g: %s", record["screening_threshold"]["threshold"], record["screening_threshold"])
    sited = [(r, region_sites(r, region_rng(r), lambda v: screening_probabilities(screening, v, device, cast)))
             for r in validation]
    score = ScreeningScorer(screening, device, cast, precision)   # the training regions' mining
    discrimination = start("discrimination", DiscriminationCNN())
    stages.append(DiscriminationStage(discrimination, score, schedule, device, cast))
    record["discrimination"] = run_stage(stages[1], schedule.discrimination_steps, schedule, seed, work, device,
                                         workers, spacing, sited, cast)
    record["discrimination_threshold"] = choose_discrimination_threshold(discrimination, sited, device, cast)
    log.info("discrimination threshold %.4g: %s", record["discrimination_threshold"]["threshold"],
             record["discrimination_threshold"])
    segmentation = start("segmentation", SegmentationUNet())
    stages.append(SegmentationStage(segmentation, score, schedule, device, cast))
    record["segmentation"] = run_stage(stages[2], schedule.segmentation_steps, schedule, seed, work, device, workers,
                                       spacing, sited, cast)
    nets = {"screening": screening, "discrimination": discrimination, "segmentation": segmentation}
    record["curves"] = {stage.name: learning_curve(record[stage.name], stage.kept_step, unit=stage.items)
                        for stage in stages}
    record["stream"] = {name: {"regions": max([e.get("regions_seen", 0) for e in record[name]] or [0]),
                               "steps": max([e.get("step", 0) for e in record[name]] or [0])} for name in STAGES}
    return {k: v.cpu().eval() for k, v in nets.items()}, record


def learning_curve(history: list[dict], kept_step: int | None = None, window: int = 50, unit: str = "") -> dict:
    """A stage's curve for the manifest: training loss averaged over `window` steps, every validation, the step
    whose state was kept, and the scale: the items (`unit`: positions, windows, patches) every training step saw,
    steps after the kept state included."""
    train = [e for e in history if "loss" in e and "validation" not in e]
    checks = [e for e in history if "validation" in e]
    means = [{"step": chunk[-1]["step"], "loss": round(float(np.mean([e["loss"] for e in chunk])), 5),
              "items_per_s": round(float(np.mean([e["items_per_s"] for e in chunk])), 1),
              "regions_seen": chunk[-1]["regions_seen"]}
             for chunk in (train[i:i + window] for i in range(0, len(train), window))]
    return {"training": means, "validation": checks, "kept_step": kept_step,
            "seconds": round(sum(e["seconds"] for e in train), 1), "steps": len(train),
            "items_seen": int(sum(e.get("items", 0) for e in train)), "unit": unit}
