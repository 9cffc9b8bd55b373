"""The physics shared by every susceptibility source.

Field: the relative field shift (ppm of B0) of a susceptibility distribution chi (ppm) is the convolution with the
dipole kernel, computed in k-space: dB/B0 = IFFT(D(k) FFT(chi)), D(k) = 1/3 - kz^2/|k|^2, B0 along the grid's
z axis (the scanner axis for the axial grids simulated here). D(0) = 0: a uniform chi shifts nothing.

Signal: spoiled GRE magnitude PD exp(-TE/T2*) per tissue; a field shift adds phase
phi = -2 pi gamma_bar B0 dB TE (gamma_bar = 42.58 MHz/T). Blooming is intravoxel dephasing: complex signals of a
fine grid averaged over each acquisition voxel (`voxel_average`).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

GAMMA_BAR_HZ_PER_T = 42.577478e6


def dipole_kernel(shape, spacing) -> np.ndarray:
    """D(k) = 1/3 - kz^2/|k|^2 on the FFT grid of a (z, y, x) volume; spacing is (x, y, z) in mm."""
    kz, ky, kx = np.meshgrid(*(np.fft.fftfreq(n, d) for n, d in zip(shape, spacing[::-1])),
                             indexing="ij", sparse=True)
    k2 = kx**2 + ky**2 + kz**2
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = 1.0 / 3.0 - kz**2 / k2
    kernel[0, 0, 0] = 0.0
    return kernel.astype(np.float32)


def field_shift_ppm(chi_ppm: np.ndarray, spacing, pad_factor: float = 2.0) -> np.ndarray:
    """dB/B0 (ppm) of a (z, y, x) susceptibility map (ppm), zero-padded to suppress wrap-around."""
    shape = np.array(chi_ppm.shape)
    padded_shape = [scipy.fft.next_fast_len(int(np.ceil(n * pad_factor))) for n in shape]
    kernel = dipole_kernel(padded_shape, spacing)
    spectrum = scipy.fft.rfftn(chi_ppm.astype(np.float32), padded_shape, workers=1)
    kernel_half = kernel[..., : spectrum.shape[-1]]
    field = scipy.fft.irfftn(spectrum * kernel_half, padded_shape, workers=1)
    return field[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def phase_radians(field_ppm, b0_tesla: float, te_ms: float):
    return -2.0 * np.pi * GAMMA_BAR_HZ_PER_T * b0_tesla * 1e-6 * (te_ms * 1e-3) * field_ppm


def gre_magnitude(pd, t2star_ms, te_ms: float):
    return pd * np.exp(-te_ms / np.maximum(t2star_ms, 1e-3))


def voxel_average(fine: np.ndarray, factors) -> np.ndarray:
    """Average a fine (z, y, x) array over blocks of factors (fz, fy, fx): the acquisition voxels."""
    fz, fy, fx = factors
    nz, ny, nx = (s // f for s, f in zip(fine.shape, factors))
    return fine[: nz * fz, : ny * fy, : nx * fx].reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5))


def tissue_parameters(b0_tesla: float, rng: np.random.Generator, wide: bool = False,
                      iron_r2star_per_s=(10.0, 25.0)) -> dict:
    """Per-case proton density and T2* (ms) of each tissue at this field strength (t2star-physics.md ranges).

    R2* grows roughly linearly with B0, so 1.5 T values are the 3 T ones times 1.5-2. `wide` draws every value over
    a wider range (ages, pathologies, sequences), so that GM/WM and tissue/CSF ratios vary far more between cases.
    """
    if wide:
        stretch = 1.0 if b0_tesla >= 2.0 else rng.uniform(1.3, 2.2)
        pd = {"wm": rng.uniform(0.58, 0.8), "gm": rng.uniform(0.7, 0.92), "csf": rng.uniform(0.85, 1.0)}
        t2 = {"wm": rng.uniform(30, 65), "gm": rng.uniform(35, 80), "csf": rng.uniform(120, 600),
              "venous_blood": rng.uniform(10, 30)}
    else:
        stretch = 1.0 if b0_tesla >= 2.0 else rng.uniform(1.5, 2.0)
        pd = {"wm": rng.uniform(0.65, 0.72), "gm": rng.uniform(0.78, 0.86), "csf": rng.uniform(0.95, 1.0)}
        t2 = {"wm": rng.uniform(40, 55), "gm": rng.uniform(45, 65), "csf": rng.uniform(250, 500),
              "venous_blood": rng.uniform(15, 25)}
    return {
        "pd": pd,
        "t2star_ms": {name: value * stretch for name, value in t2.items()},
        # Extra R2* (1/s) of iron-rich deep nuclei (pallidum, putamen, dentate) at full iron weight.
        "iron_r2star_per_s": rng.uniform(*iron_r2star_per_s) * b0_tesla / 3.0,
    }
