"""Susceptibility sources (microbleeds, veins, calcifications) rendered through the field model.

Each source is simulated on its own fine grid (<= 0.25 mm by default), aligned so that an integer number of fine
points subdivides each acquisition voxel and covering the source plus the distance at which its phase falls below
~0.2 rad. On that grid: the source's partial-volume fraction f, its susceptibility chi = f * dchi, the field via the
dipole kernel, and the complex signal relative to the surrounding tissue, ((1 - f) + f * rho) exp(i phi), with rho the
source's own relative signal (about 0 for a haemosiderin core). Averaging it over each acquisition voxel gives the
voxel's complex factor: the magnitude drop spreading beyond the core is the blooming.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .physics import GAMMA_BAR_HZ_PER_T, field_shift_ppm, phase_radians, voxel_average

PHASE_CUTOFF_RAD = 0.2


@dataclass
class Source:
    kind: str                          # "cmb", "vein", "calcification", "flow_void"
    centre_mm: np.ndarray              # (x, y, z) world
    radius_mm: float                   # core / vessel radius
    chi_ppm: float                     # susceptibility relative to tissue
    relative_signal: float = 0.0       # the source's own signal relative to the tissue around it
    axis: np.ndarray | None = None     # unit vector (x, y, z) for a vessel
    length_mm: float = 0.0             # vessel length
    meta: dict = field(default_factory=dict)
    # a tortuous or branching vessel: straight pieces (start, end), each (x, y, z) world mm, of one radius
    segments: list | None = None

    @property
    def is_vessel(self) -> bool:
        return self.axis is not None or bool(self.segments)

    @property
    def moment_ppm_mm3(self) -> float:
        if self.segments:
            length = sum(float(np.linalg.norm(np.asarray(b) - np.asarray(a))) for a, b in self.segments)
            return self.chi_ppm * np.pi * self.radius_mm**2 * length
        if self.axis is None:
            return self.chi_ppm * 4.0 / 3.0 * np.pi * self.radius_mm**3
        return self.chi_ppm * np.pi * self.radius_mm**2 * self.length_mm


@dataclass
class Rendered:
    """A source's effect on the acquisition voxels lo:hi (z, y, x)."""

    lo: np.ndarray
    hi: np.ndarray
    factor: np.ndarray                 # complex64 per acquisition voxel
    core_fraction: np.ndarray          # fraction of each acquisition voxel inside the source

    @property
    def slices(self):
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))


def influence_margin_mm(source: Source, b0: float, te_ms: float) -> float:
    """Distance from the source's surface beyond which its phase stays under PHASE_CUTOFF_RAD."""
    scale = abs(2 * np.pi * GAMMA_BAR_HZ_PER_T * b0 * 1e-6 * te_ms * 1e-3 * source.chi_ppm)
    if not source.is_vessel:  # sphere: phase ~ scale/3 * (a/r)^3 * 2
        reach = source.radius_mm * max(1.0, (2 * scale / 3 / PHASE_CUTOFF_RAD) ** (1 / 3))
    else:                     # cylinder: phase ~ scale/2 * (a/r)^2
        reach = source.radius_mm * max(1.0, np.sqrt(scale / 2 / PHASE_CUTOFF_RAD))
    return float(np.clip(reach - source.radius_mm, 1.0, 12.0))


def render(source: Source, shape, spacing, origin, b0: float, te_ms: float,
           fine_mm: float = 0.25) -> Rendered | None:
    """Render `source` on an axis-aligned acquisition grid (shape z, y, x; spacing/origin x, y, z)."""
    spacing = np.asarray(spacing, float)
    origin = np.asarray(origin, float)
    margin = influence_margin_mm(source, b0, te_ms) + source.radius_mm
    if source.segments:
        points = np.array([p for segment in source.segments for p in segment])
        extent_lo, extent_hi = points.min(axis=0) - margin, points.max(axis=0) + margin
    elif source.axis is None:
        extent_lo, extent_hi = source.centre_mm - margin, source.centre_mm + margin
    else:
        ends = [source.centre_mm + s * source.axis * source.length_mm / 2 for s in (-1, 1)]
        extent_lo, extent_hi = np.minimum(*ends) - margin, np.maximum(*ends) + margin
    lo_xyz = np.floor((extent_lo - origin) / spacing + 0.5).astype(int)
    hi_xyz = np.ceil((extent_hi - origin) / spacing + 0.5).astype(int)
    lo_xyz = np.maximum(lo_xyz, 0)
    hi_xyz = np.minimum(hi_xyz, np.asarray(shape)[::-1])
    if np.any(hi_xyz <= lo_xyz):
        return None

    factors_xyz = np.maximum(1, np.ceil(spacing / fine_mm).astype(int))
    fine_spacing = spacing / factors_xyz
    counts = (hi_xyz - lo_xyz) * factors_xyz
    # fine point centres: voxel v spans (v - 1/2 .. v + 1/2) * spacing around origin + v * spacing
    axes = [origin[i] + (lo_xyz[i] - 0.5) * spacing[i] + (np.arange(counts[i]) + 0.5) * fine_spacing[i]
            for i in range(3)]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij", sparse=True)
    d = _distance(source, x, y, z)
    h = float(fine_spacing.min())
    fraction = np.clip((source.radius_mm - d) / h + 0.5, 0.0, 1.0).astype(np.float32)

    field = field_shift_ppm(fraction * np.float32(source.chi_ppm), fine_spacing)
    phase = phase_radians(field, b0, te_ms).astype(np.float32)
    magnitude = (1.0 - fraction) + fraction * np.float32(source.relative_signal)
    fine_signal = magnitude * np.exp(1j * phase).astype(np.complex64)
    factors_zyx = tuple(factors_xyz[::-1])
    factor = voxel_average(fine_signal, factors_zyx).astype(np.complex64)
    core = voxel_average(fraction, factors_zyx).astype(np.float32)
    return Rendered(lo_xyz[::-1].copy(), hi_xyz[::-1].copy(), factor, core)


def _distance(source: Source, x, y, z):
    if source.segments:
        return np.minimum.reduce([_segment_distance(a, b, x, y, z) for a, b in source.segments])
    dx, dy, dz = x - source.centre_mm[0], y - source.centre_mm[1], z - source.centre_mm[2]
    if source.axis is None:
        return np.sqrt(dx**2 + dy**2 + dz**2)
    ax, ay, az = source.axis
    along = dx * ax + dy * ay + dz * az
    clipped = np.clip(along, -source.length_mm / 2, source.length_mm / 2)
    return np.sqrt((dx - clipped * ax) ** 2 + (dy - clipped * ay) ** 2 + (dz - clipped * az) ** 2)


def _segment_distance(start, end, x, y, z):
    """Distance from every point (x, y, z broadcast) to the segment start-end."""
    axis = np.asarray(end, float) - np.asarray(start, float)
    length = float(np.linalg.norm(axis))
    centre = (np.asarray(start, float) + np.asarray(end, float)) / 2
    axis = axis / max(length, 1e-9)
    return _distance(Source("vein", centre, 0.0, 0.0, axis=axis, length_mm=length), x, y, z)
