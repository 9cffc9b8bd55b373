"""Test-time batch-norm adaptation: the screening and discrimination networks' normalisation corrected per scan.

Batch norm normalises each channel by a mean and variance stored at training time. A scanner with other contrast,
noise or texture moves the activations, and recomputing the statistics on the scan itself is a cheap, label-free
adaptation (Schneider et al., NeurIPS 2020). Recomputed plainly, though, the statistics of a whole scan replace
those of training's crops, which sit on microbleeds, veins and other dark spots far more often than a scan's brain
does: on the in-distribution example that raised the candidates from 1,166 to the 2,000 cap and the confirmed ones
from 202 to 1,040 (docs/training.md).

So the correction is relative. For each batch norm, the same measurement (the per-channel mean and standard
deviation of its input over brain crops drawn the same way) is made once on simulated reference scans through the
trained network (`reference_moments`, stored with the weights by `python -m valdocmb.bench.batch_norm`) and on each
scan through the adapted layers before it. Each channel of the scan is moved onto the reference's distribution
before the trained normalisation applies:

    y = gamma * ((x - mu_scan) * s_ref / s_scan + mu_ref - mu_train) / s_train + beta

which is a batch norm with mean mu_scan - (mu_ref - mu_train) * s_scan / s_ref and standard deviation
s_train * s_scan / s_ref. On a reference scan it is the trained network exactly. The learned scale and offset stay;
the stored statistics come back after the case (`restore`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from .patches import extract_patches

log = logging.getLogger(__name__)

# Screening's measurement: crops of this size (input voxels, z y x) centred on brain voxels drawn with a fixed seed,
# all in one batch (about 0.2 GB of activations), so the same scan adapts the same way.
SCREENING_CROP = (32, 48, 48)
SCREENING_CROPS = 8
# Discrimination's: the unshifted patches of up to MAX_CANDIDATES candidates spread evenly over the list. With fewer
# than MIN_CANDIDATES the deeper layers' moments (4x4x4 positions per patch) are too noisy: the stored ones stay.
MIN_CANDIDATES = 32
MAX_CANDIDATES = 128


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def snapshot(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The stored running statistics of every batch norm in `module`, to `restore` later."""
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batch_norms(module)]  # type: ignore[union-attr]


def restore(module: nn.Module, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for bn, (mean, var) in zip(batch_norms(module), saved, strict=True):
        bn.running_mean.copy_(mean)   # type: ignore[union-attr]
        bn.running_var.copy_(var)     # type: ignore[union-attr]


def channel_moments(x: torch.Tensor) -> np.ndarray:
    """(3, channels) float64: count, sum and sum of squares of each channel of an (N, C, ...) activation."""
    x = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    return np.stack([np.full(x.shape[0], x.shape[1], np.float64), x.sum(1).cpu().numpy(),
                     (x * x).sum(1).cpu().numpy()])


def mean_and_std(moments: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    count, total, squares = moments
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0) + eps)


@torch.no_grad()
def reference_moments(module: nn.Module, batches) -> list[np.ndarray]:
    """The input moments of each of `module`'s batch norms over `batches`, through the network as it is (evaluation
    mode): the reference a scan is corrected towards. Moments add up, so scans and batches pool by summing."""
    norms = batch_norms(module)
    totals = [np.zeros((3, bn.num_features)) for bn in norms]

    def hook(index):
        def add(_bn, args):
            totals[index] += channel_moments(args[0])
        return add

    handles = [bn.register_forward_pre_hook(hook(i)) for i, bn in enumerate(norms)]
    try:
        module.eval()
        for batch in batches:
            module(batch)
    finally:
        for handle in handles:
            handle.remove()
    return totals


@torch.no_grad()
def adapt_to_reference(module: nn.Module, batch: torch.Tensor, reference: list[np.ndarray]) -> None:
    """Set each batch norm of `module` (holding its trained statistics) to move this batch's activations onto the
    reference's distribution (module docstring). One pass over the batch: each layer's correction is computed from
    its input as the corrected layers before it made it."""
    norms = batch_norms(module)
    if len(reference) != len(norms):
        raise ValueError(f"the reference has {len(reference)} batch norms, the network {len(norms)}")

    def hook(index):
        def correct(bn, args):
            eps = bn.eps
            mu_scan, s_scan = mean_and_std(channel_moments(args[0]), eps)
            mu_ref, s_ref = mean_and_std(reference[index], eps)
            mu_train = bn.running_mean.double().cpu().numpy()
            s_train = np.sqrt(bn.running_var.double().cpu().numpy() + eps)
            mean = mu_scan - (mu_ref - mu_train) * s_scan / s_ref
            var = np.maximum((s_train * s_scan / s_ref) ** 2 - eps, 0.0)
            bn.running_mean.copy_(torch.from_numpy(mean))
            bn.running_var.copy_(torch.from_numpy(var))
        return correct

    handles = [bn.register_forward_pre_hook(hook(i)) for i, bn in enumerate(norms)]
    try:
        module.eval()
        module(batch)
    finally:
        for handle in handles:
            handle.remove()


def screening_crops(volume: np.ndarray, foreground: np.ndarray, seed: int = 0) -> torch.Tensor | None:
    """(n, 1, *SCREENING_CROP) crops around brain voxels drawn uniformly with a fixed seed; None without brain."""
    inside = np.argwhere(foreground)
    if not len(inside):
        return None
    chosen = np.random.default_rng(seed).choice(len(inside), min(SCREENING_CROPS, len(inside)), replace=False)
    return torch.from_numpy(extract_patches(volume, inside[np.sort(chosen)], SCREENING_CROP))[:, None]


def discrimination_patches(volume: np.ndarray, centres, patch_size) -> torch.Tensor | None:
    """(n, 1, *patch_size) unshifted patches of up to MAX_CANDIDATES candidates; None with fewer than
    MIN_CANDIDATES."""
    centres = np.asarray(centres, int).reshape(-1, 3)
    if len(centres) < MIN_CANDIDATES:
        return None
    spread = np.unique(np.linspace(0, len(centres) - 1, min(len(centres), MAX_CANDIDATES)).round().astype(int))
    return torch.from_numpy(extract_patches(volume, centres[spread], patch_size))[:, None]
