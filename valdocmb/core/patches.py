"""Fixed-size patches around centre voxels, with zero padding beyond the volume's edges.

Convention shared by inference and training: a patch of size n along an axis centred at voxel c starts at
c - n // 2 (for even n the centre is the first voxel of the upper half).
"""

from __future__ import annotations

import numpy as np


def patch_start(centre, size) -> np.ndarray:
    return np.asarray(centre, int) - np.asarray(size, int) // 2


def extract_patches(volume: np.ndarray, centres, size) -> np.ndarray:
    """(N, *size) float32 patches of a (z, y, x) volume around each centre; outside the volume reads as 0.

    Each patch copies only its part inside the volume (no padded copy of the whole volume: a 512x512x192 scan
    would be copied once per batch of candidates)."""
    size = np.asarray(size, int)
    centres = np.asarray(centres, int).reshape(-1, 3)
    shape = np.asarray(volume.shape)
    out = np.zeros((len(centres), *size), np.float32)
    for n, start in enumerate(patch_start(centres, size)):
        lo, hi = np.maximum(start, 0), np.minimum(start + size, shape)
        if np.any(hi <= lo):
            continue
        inside = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        out[n][inside] = volume[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return out


def add_patches(accumulator: np.ndarray, counts: np.ndarray, patches: np.ndarray, centres) -> None:
    """Add patches back at their centres (the inverse of extract_patches), clipping at the volume's edges."""
    size = np.asarray(patches.shape[1:], int)
    shape = np.asarray(accumulator.shape)
    for patch, start in zip(patches, patch_start(centres, size)):
        lo = np.maximum(start, 0)
        hi = np.minimum(start + size, shape)
        if np.any(hi <= lo):
            continue
        src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        dst = tuple(slice(a, b) for a, b in zip(lo, hi))
        accumulator[dst] += patch[src]
        counts[dst] += 1
