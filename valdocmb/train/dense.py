"""Training arithmetic that shares computation between samples, the way inference already does.

- Dense screening: the FCN on a crop gives the logits of every patch position in it (score (i, j, k) is the patch
  starting at crop voxel (2i, 2j, 2k)); every position gets a target from the label under its patch centre:
  CMB where the centre lies on a microbleed, ignored in a band around one (a patch there is neither clearly a
  microbleed nor clearly not) and outside the brain, background elsewhere. One pass over a 48x64x64 crop labels
  8,993 positions for the arithmetic of about 80 separate patches.
- Shared discrimination: C1-C2 once over a region 2 * MAX_SHIFT larger than a patch, then many shifted 24x24x20
  windows of their output through pooling, C3-C4 and the classifier: the translation augmentation costs one region.
- Both use one loss, `position_loss`: cross entropy weighted per position, with the weights of each class summing
  to its class weight (the paper's 0.25 / 0.75, times the share the paper's sampling gave each class), so the loss
  stays the paper's whatever the count of background positions. The per-patch formulation with the same positions
  and weights gives the same loss and gradients (tests/test_train_dense.py).
  Screening may count only the hardest background positions of a batch (`hardest_negatives`).
- Augmentation on whole batches with torch (in-plane rotation < 10 degrees, lateral flip, intensity jitter), and
  bfloat16 autocast on CPUs with native bfloat16 and on CUDA (`autocast`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN

from ..core.device import cpu_has_bfloat16
from .samples import MAX_ROTATION_DEG, MAX_SHIFT  # noqa: F401  (the pool path's augmentation ranges)

CLASS_WEIGHTS = (0.25, 0.75)            # background, CMB: the paper's cross-entropy weights
# the share of each class among the paper's screening samples (positives : random : mined negatives = 1 : 2 : 1)
PAPER_CLASS_SHARE = (0.75, 0.25)
SCREEN_CROP = (48, 64, 64)              # z, y, x of a dense screening crop
IGNORE_BAND = (1, 2, 2)                 # voxels (z, y, x) around a microbleed whose patches are neither class
IGNORE = -1


def autocast(device: torch.device, precision: str):
    """The training arithmetic: "bfloat16" (autocast; on CUDA, AMP without a gradient scaler, which bfloat16's
    range makes unnecessary) or "float32"; "auto" picks bfloat16 on CUDA and on CPUs with native bfloat16.
    Returns (context factory, resolved name)."""
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" or cpu_has_bfloat16() else "float32"
    if precision not in ("bfloat16", "float32"):
        raise ValueError(f"training precision {precision!r}: one of auto, bfloat16, float32")
    if precision == "float32":
        return contextlib.nullcontext, precision
    dtype = getattr(torch, precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision


# -- targets ---------------------------------------------------------------------------------------------------------
def patch_centre_offset() -> np.ndarray:
    """Voxel (z, y, x) of a screening patch's centre relative to its start (score i <-> patch start 2i)."""
    return np.array(ScreeningFCN.patch_size) // 2


def screening_targets(label: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """int64 target of every score position of a crop: 1 (patch centre on a microbleed), 0 (background), IGNORE
    (the band around a microbleed, or a centre outside the brain). Shape: the FCN's output for the crop."""
    stride = ScreeningFCN.stride
    out = [ScreeningFCN.output_size(n, p) for n, p in zip(label.shape, ScreeningFCN.patch_size)]
    first = patch_centre_offset()
    centres = tuple(slice(f, f + stride * (n - 1) + 1, stride) for f, n in zip(first, out))
    lesion = label.astype(bool)
    band = ndimage.binary_dilation(lesion, np.ones(tuple(2 * r + 1 for r in IGNORE_BAND), bool)) & ~lesion
    target = np.zeros(out, np.int64)
    target[band[centres]] = IGNORE
    target[~foreground[centres]] = IGNORE
    target[lesion[centres]] = 1
    return target


def class_balanced_weights(target: torch.Tensor, share=PAPER_CLASS_SHARE) -> torch.Tensor:
    """Per-position loss weights: each class's positions share its weight CLASS_WEIGHTS[c] * share[c] equally
    (0 for IGNORE). A batch without positives weighs its background alone, as the paper's weighted mean does."""
    weights = torch.zeros(target.shape, dtype=torch.float32, device=target.device)
    for cls in (0, 1):
        chosen = target == cls
        count = int(chosen.sum())
        if count:
            weights[chosen] = CLASS_WEIGHTS[cls] * share[cls] / count
    return weights / weights.sum().clamp_min(1e-12)


def hardest_negatives(logits: torch.Tensor, target: torch.Tensor, keep: int) -> torch.Tensor:
    """The target with all but the `keep` highest-scoring background positions set to IGNORE (per batch)."""
    negative = target == 0
    count = int(negative.sum())
    if count <= keep:
        return target
    margin = (logits[:, 1] - logits[:, 0]).detach().float()
    threshold = torch.topk(margin[negative], keep, sorted=False).values.min()
    return torch.where(negative & (margin < threshold), torch.full_like(target, IGNORE), target)


def position_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(weight * cross entropy) over positions. logits (N, 2, ...) or (N, 2); target and weights (N, ...)."""
    ce = nn.functional.cross_entropy(logits.float(), target.clamp_min(0), reduction="none")
    return (ce * weights).sum()


def dense_screening_loss(net: ScreeningFCN, crops: torch.Tensor, target: torch.Tensor, hard_negatives: int = 0):
    """(loss, logits) of the FCN over (N, 1, z, y, x) crops against `screening_targets`; with `hard_negatives`,
    only that many of the hardest background positions per batch count (online hard-negative mining)."""
    logits = net(crops)
    if hard_negatives:
        target = hardest_negatives(logits, target, hard_negatives)
    return position_loss(logits, target, class_balanced_weights(target)), logits


# -- shared discrimination -------------------------------------------------------------------------------------------
DISCRIMINATION_REGION = tuple(p + 2 * MAX_SHIFT for p in DiscriminationCNN.patch_size)


def shared_discrimination_logits(net: DiscriminationCNN, regions: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Logits (N * K, 2) of K shifted patches per region: regions (N, 1, *DISCRIMINATION_REGION), shifts (N, K, 3)
    integer offsets in [-MAX_SHIFT, MAX_SHIFT] of each patch from the region's centre. C1-C2 run once per region;
    the windows are one gather (its gradient one scatter-add, not a region-sized gradient per window)."""
    local = net.local_features(regions)
    return net.classify_local(windows_of(local, shifts, [n - 2 * MAX_SHIFT for n in local.shape[2:]]))


def windows_of(volumes: torch.Tensor, shifts: torch.Tensor, size) -> torch.Tensor:
    """(N * K, C, *size) windows of (N, C, z, y, x) volumes, window (n, k) starting at MAX_SHIFT + shifts[n, k]."""
    n, k = shifts.shape[:2]
    starts = (shifts.reshape(-1, 3) + MAX_SHIFT).to(volumes.device)
    index = [starts[:, axis, None] + torch.arange(size[axis], device=volumes.device) for axis in range(3)]
    batch = torch.arange(n, device=volumes.device).repeat_interleave(k)
    channels_last = volumes.permute(0, 2, 3, 4, 1)                       # (N, z, y, x, C)
    picked = channels_last[batch[:, None, None, None], index[0][:, :, None, None], index[1][:, None, :, None],
                           index[2][:, None, None, :]]                   # (N * K, *size, C)
    return picked.permute(0, 4, 1, 2, 3)


def window_of(regions: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The (N * K, 1, *patch) input patches the shifted windows of `shared_discrimination_logits` stand for."""
    return windows_of(regions, shifts, DiscriminationCNN.patch_size)


def random_shifts(rng: np.random.Generator, count: int, per_region: int) -> torch.Tensor:
    """(count, per_region, 3) distinct translations per region (the centre always among them)."""
    grid = np.stack(np.meshgrid(*[np.arange(-MAX_SHIFT, MAX_SHIFT + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = len(grid) // 2
    others = np.delete(np.arange(len(grid)), centre)
    chosen = [np.concatenate([[centre], rng.choice(others, per_region - 1, replace=False)]) for _ in range(count)]
    return torch.from_numpy(grid[np.array(chosen)])


# -- batch augmentation ----------------------------------------------------------------------------------------------
def rotate_and_flip(volumes: torch.Tensor, labels: torch.Tensor | None, rng: np.random.Generator):
    """In-plane rotation (< MAX_ROTATION_DEG, about each crop's centre; linear for volumes, nearest for labels) and
    a lateral (x) flip, per crop, for a whole (N, C, z, y, x) batch at once."""
    n = volumes.shape[0]
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n))
    flips = rng.random(n) < 0.5
    theta = torch.zeros((n, 3, 4), dtype=torch.float32)
    cos, sin = torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()
    # affine_grid works in normalised (x, y, z) coordinates; the in-plane turn keeps physical angles on the
    # square in-plane grid of a crop
    scale = volumes.shape[4] / volumes.shape[3]                         # x extent / y extent
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin * scale, cos
    theta[:, 2, 2] = 1
    theta[:, 0, :3] *= torch.from_numpy(np.where(flips, -1.0, 1.0)).float()[:, None]
    theta = theta.to(volumes.device)
    grid = nn.functional.affine_grid(theta, list(volumes.shape), align_corners=False)
    volumes = nn.functional.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if labels is not None:
        labels = nn.functional.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros",
                                           align_corners=False)
    return volumes, labels


def intensity_jitter(volumes: torch.Tensor, foreground: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Scale and offset per crop (x U(0.8, 1.25), + U(-0.3, 0.3) inside the brain): the z-score of a scan depends on
    what else is in it (CSF, atrophy, lesions, skull-stripping leftovers), and a region's estimate of its scan's
    z-score misses by about that much (docs/training.md, "From scratch on streamed simulation")."""
    n = volumes.shape[0]
    scale = torch.from_numpy(np.exp(rng.uniform(np.log(0.8), np.log(1.25), n))).float().view(n, 1, 1, 1, 1)
    offset = torch.from_numpy(rng.uniform(-0.3, 0.3, n)).float().view(n, 1, 1, 1, 1).to(volumes.device)
    scale = scale.to(volumes.device)
    return (volumes * scale + offset) * foreground


def poly_rate(base: float, step: int, total: int) -> float:
    """The paper's poly decay (1 - step / total) ^ 0.9."""
    return base * max(0.0, 1 - step / total) ** 0.9


def count_positions(target: torch.Tensor) -> int:
    return int((target != IGNORE).sum())
