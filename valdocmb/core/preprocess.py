"""Preprocessing as the three-stage paper describes, and its exact inverse.

Forward (`preprocess`): non-finite voxels and background to 0, reorientation to a canonical axis order (LPS, a
lossless permutation/flip, so thick slices end up on the last array axis for axial scans), resampling to a target
spacing (third-order B-spline for the scan, nearest for the foreground mask) over the same field of view,
z-score over the foreground, and cropping to the foreground's bounding box.

Inverse (`Preprocessed.to_original`): pads a volume computed on the cropped processing grid back to the full
processing grid and maps it onto the original grid in physical space (linear for probabilities, nearest for
labels), so the result has exactly the input's size, spacing, origin and direction. When the processing grid is
the input grid (no resampling was needed) the inverse is an exact axis permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import CaseError

# Median VALDO 2021 T2* spacing (x, y, z) in mm: the grid the networks are trained on.
DEFAULT_TARGET_SPACING = (0.49, 0.49, 0.80)
CANONICAL_ORIENTATION = "LPS"

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
}


@dataclass(frozen=True)
class Geometry:
    """Size, spacing, origin and direction of a 3D grid (SimpleITK order: x, y, z)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x) of an image on this grid."""
        size = self.size
        return size[2], size[1], size[0]

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def box(self, crop: tuple[slice, slice, slice]) -> "Geometry":
        """The part of this grid that `crop` (array slices z, y, x) cuts out: the same voxel centres."""
        start = [int(crop[2].start), int(crop[1].start), int(crop[0].start)]
        size = (crop[2].stop - crop[2].start, crop[1].stop - crop[1].start, crop[0].stop - crop[0].start)
        reference = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        self.apply_to(reference)                         # ITK's own index-to-point arithmetic
        return Geometry((int(size[0]), int(size[1]), int(size[2])), self.spacing,
                        reference.TransformIndexToPhysicalPoint(start), self.direction)

    def resample(self, image: sitk.Image, interpolation: str, pixel_type=sitk.sitkFloat32) -> sitk.Image:
        """Sample `image` on this grid in physical space; points just outside its extent take the nearest value."""
        return sitk.Resample(
            image, self.size, sitk.Transform(), _INTERPOLATORS[interpolation], self.origin, self.spacing,
            self.direction, 0.0, pixel_type, True,
        )


def resampled_grid(grid: Geometry, target_spacing) -> Geometry:
    """The grid with `target_spacing` covering the same field of view (voxel edges) as `grid`."""
    spacing = np.asarray(grid.spacing, float)
    target = np.asarray(target_spacing, float)
    size = np.maximum(1, np.round(np.asarray(grid.size) * spacing / target)).astype(int)
    direction = np.asarray(grid.direction).reshape(3, 3)
    # First voxel centre moves from half an old voxel to half a new voxel inside the field-of-view edge.
    origin = np.asarray(grid.origin) + direction @ ((target - spacing) / 2)
    return Geometry((int(size[0]), int(size[1]), int(size[2])), tuple(target.tolist()), tuple(origin.tolist()),
                    grid.direction)


@dataclass
class Preprocessed:
    """A scan on the processing grid, and what is needed to map results back to the input grid."""

    array: np.ndarray          # (z, y, x) float32, z-scored, background 0, cropped
    foreground: np.ndarray     # (z, y, x) bool, same shape as array
    original: Geometry         # the input grid
    oriented: Geometry         # the input grid after reorientation (same voxels, permuted axes)
    grid: Geometry             # the full (uncropped) processing grid
    crop: tuple[slice, slice, slice]  # where `array` lies in the processing grid (z, y, x)
    resampled: bool            # False when the processing grid is the reoriented input grid

    def uncrop(self, volume: np.ndarray, fill: float = 0.0) -> np.ndarray:
        if volume.shape != self.array.shape:
            raise ValueError(f"volume shape {volume.shape} != preprocessed shape {self.array.shape}")
        full = np.full(self.grid.shape, fill, dtype=volume.dtype)
        full[self.crop] = volume
        return full

    def to_original(self, volume: np.ndarray, interpolation: str = "linear") -> sitk.Image:
        """Map a (cropped) processing-grid volume onto the input grid: float32 image with the input's geometry."""
        image = self.grid.apply_to(sitk.GetImageFromArray(self.uncrop(volume.astype(np.float32))))
        if self.resampled:
            out = self.original.resample(image, interpolation)
        else:
            code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.original.direction)
            out = sitk.DICOMOrient(image, code)
            if out.GetSize() != self.original.size:
                raise CaseError(f"reorienting the result back gave size {out.GetSize()}, not the input's "
                                f"{self.original.size}")
        return self.original.apply_to(out)  # exact input geometry, free of round-off

    def voxel_to_world(self, zyx) -> np.ndarray:
        """Physical (x, y, z) mm of (N, 3) or (3,) voxel indices (z, y, x) of the cropped processing grid."""
        zyx = np.asarray(zyx, float)
        start = np.array([s.start for s in self.crop], float)
        xyz = (zyx + start)[..., ::-1]
        direction = np.asarray(self.grid.direction).reshape(3, 3)
        return np.asarray(self.grid.origin) + (xyz * np.asarray(self.grid.spacing)) @ direction.T

    def world_to_voxel(self, points_xyz) -> np.ndarray:
        """Continuous (z, y, x) indices on the cropped processing grid of physical (x, y, z) mm points."""
        points = np.asarray(points_xyz, float)
        start = np.array([s.start for s in self.crop], float)
        direction = np.asarray(self.grid.direction).reshape(3, 3)
        xyz = ((points - np.asarray(self.grid.origin)) @ direction) / np.asarray(self.grid.spacing)
        return xyz[..., ::-1] - start

    def from_original(self, image: sitk.Image, interpolation: str = "nearest") -> np.ndarray:
        """Map an input-grid image (e.g. a label mask) onto the cropped processing grid."""
        if image.GetSize() != self.original.size:
            raise ValueError(f"image size {image.GetSize()} != input size {self.original.size}")
        image = sitk.Cast(image, sitk.sitkFloat32)
        self.original.apply_to(image)
        oriented = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
        if self.resampled:
            oriented = self.grid.resample(oriented, interpolation)
        return sitk.GetArrayFromImage(oriented)[self.crop]


def preprocess(
    image: sitk.Image,
    target_spacing=DEFAULT_TARGET_SPACING,
    crop_margin: int = 4,
    spacing_tolerance: float = 0.01,
) -> Preprocessed:
    """Bring a scan onto the processing grid. `target_spacing=None` keeps the input spacing."""
    original = Geometry.of(image)
    oriented_image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    oriented = Geometry.of(oriented_image)

    values = sitk.GetArrayFromImage(oriented_image).astype(np.float32)
    values[~np.isfinite(values)] = 0.0
    foreground = values != 0

    needs_resampling = target_spacing is not None and not np.allclose(
        oriented.spacing, target_spacing, rtol=spacing_tolerance, atol=0
    )
    if needs_resampling:
        grid = resampled_grid(oriented, target_spacing)
        fg_image = oriented.apply_to(sitk.GetImageFromArray(foreground.astype(np.uint8)))
        foreground = sitk.GetArrayFromImage(grid.resample(fg_image, "nearest", sitk.sitkUInt8)) > 0
    else:
        grid = oriented
    if not foreground.any():
        raise CaseError(f"no brain voxel left after resampling to {tuple(target_spacing)} mm (the scan's non-zero "
                        "region is smaller than one processing voxel)")
    crop = _bounding_box(foreground, crop_margin)
    foreground = foreground[crop]
    if needs_resampling:
        # the B-spline only on the brain's box: a coarse scan's processing grid is 2-3x larger than that box, and
        # its voxels inside the box are the same physical points
        values_image = oriented.apply_to(sitk.GetImageFromArray(values))
        values = sitk.GetArrayFromImage(grid.box(crop).resample(values_image, "bspline"))
    else:
        values = values[crop]

    fg_values = values[foreground].astype(np.float64)
    mean, std = fg_values.mean(), fg_values.std()
    values = np.where(foreground, (values - mean) / (std if std > 0 else 1.0), 0.0).astype(np.float32)
    return Preprocessed(values, foreground, original, oriented, grid, crop, needs_resampling)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        lo = max(0, int(present[0]) - margin)
        hi = min(mask.shape[axis], int(present[-1]) + 1 + margin)
        slices.append(slice(lo, hi))
    return slices[0], slices[1], slices[2]
