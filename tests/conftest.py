"""Small synthetic volumes with chosen geometry, and a deterministic stand-in segmenter for I/O tests."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from valdocmb.core.preprocess import preprocess
from valdocmb.core.result import SegmentationResult


def rotation(*degrees_xyz) -> np.ndarray:
    return Rotation.from_euler("xyz", degrees_xyz, degrees=True).as_matrix()


def make_image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """An image from a (z, y, x) array with the given geometry."""
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, float).ravel().tolist()))
    return image


def brain_like(shape=(20, 40, 36), seed=0, dark_spots=((10, 20, 18),)) -> np.ndarray:
    """An ellipsoid 'brain' of noisy tissue on zero background, with dark 2-voxel-radius spots."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = zz**2 + yy**2 + xx**2 < 0.8
    array = np.where(inside, rng.normal(100.0, 5.0, shape), 0.0).astype(np.float32)
    for z, y, x in dark_spots:
        array[max(z - 1, 0):z + 2, max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = 10.0
    return array


class DarkSpotSegmenter:
    """Stand-in method for I/O tests: marks voxels far below the foreground mean, through the real preprocessing."""

    def __init__(self, z_threshold: float = -4.0):
        self.z_threshold = z_threshold

    def segment(self, image: sitk.Image, timings: dict) -> SegmentationResult:
        pre = preprocess(image)
        probability = ((pre.array < self.z_threshold) & pre.foreground).astype(np.float32)
        back = pre.to_original(probability, "linear")
        mask = sitk.Cast(sitk.BinaryThreshold(back, 0.5, 1e9, 1, 0), sitk.sitkUInt8)
        mask.CopyInformation(image)
        timings["segment"] = 0.0
        return SegmentationResult(mask, back, [], {"method": "dark-spot stand-in"})


@pytest.fixture
def segmenter():
    return DarkSpotSegmenter()


@pytest.fixture(autouse=True)
def same_arithmetic_on_every_machine(monkeypatch):
    """The command line's precision `auto` depends on the CPU (bfloat16 where it is native): tests that run the
    whole command get float32 everywhere, so their figures do not depend on the machine. `auto` is tested apart."""
    monkeypatch.setenv("CMB_PRECISION", "float32")
