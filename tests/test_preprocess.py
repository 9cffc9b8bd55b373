import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.core.preprocess import DEFAULT_TARGET_SPACING, Geometry, preprocess, resampled_grid

from conftest import brain_like, make_image, rotation

PERMUTED = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # array axes along world y, -z, x

# Grids no coarser than the 0.49 x 0.49 x 0.8 mm processing grid along any world axis: the round trip is exact.
FINE_OR_EQUAL_GRIDS = [
    pytest.param((0.9, 0.7, 3.1), np.eye(3), id="anisotropic"),
    pytest.param((1.0, 1.0, 4.0), rotation(20, -10, 35), id="oblique-thick-slices"),
    pytest.param((0.8, 1.1, 0.49), PERMUTED, id="permuted-axes"),
    pytest.param((0.49, 0.49, 0.8), np.diag([-1.0, -1.0, 1.0]), id="no-resampling"),
]


def blob_mask(shape):
    mask = np.zeros(shape, np.float32)
    mask[3:8, 10:20, 5:15] = 1
    mask[2, 30, 30] = 1          # a single voxel
    mask[-1, -1, -1] = 1         # a corner voxel, at the edge of the field of view
    return mask


@pytest.mark.parametrize("spacing,direction", FINE_OR_EQUAL_GRIDS)
def test_round_trip_reproduces_mask_voxel_for_voxel(spacing, direction):
    shape = (13, 37, 41)  # odd sizes
    head = brain_like(shape) + 20.0  # foreground fills the grid, so the corner voxel tests the field-of-view edge
    scan = make_image(head, spacing, (3.0, -5.0, 7.0), direction)
    mask = blob_mask(shape)
    pre = preprocess(scan, crop_margin=0)
    on_grid = pre.from_original(make_image(mask, spacing, (3.0, -5.0, 7.0), direction), "nearest")
    back = pre.to_original(on_grid, "nearest")

    assert back.GetSize() == scan.GetSize()
    assert back.GetSpacing() == scan.GetSpacing()
    assert back.GetOrigin() == scan.GetOrigin()
    assert back.GetDirection() == scan.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)


@pytest.mark.parametrize("spacing,direction", FINE_OR_EQUAL_GRIDS)
def test_round_trip_of_probabilities_with_linear_interpolation(spacing, direction):
    shape = (13, 37, 41)
    scan = make_image(brain_like(shape) + 20.0, spacing, (1.0, 2.0, 3.0), direction)
    mask = blob_mask(shape)
    pre = preprocess(scan)
    on_grid = pre.from_original(make_image(mask, spacing, (1.0, 2.0, 3.0), direction), "nearest")
    back = sitk.GetArrayFromImage(pre.to_original(on_grid, "linear"))
    assert back.min() >= 0 and back.max() <= 1
    np.testing.assert_array_equal(back >= 0.5, mask > 0)


@pytest.mark.parametrize("spacing,direction", [
    pytest.param((0.6, 0.6, 0.3), rotation(0, 0, 15), id="thin-slices"),
    pytest.param((0.449, 0.449, 4.0), np.diag([-1.0, 1.0, -1.0]), id="sabre-like-flipped"),
])
def test_round_trip_on_a_coarser_processing_grid_keeps_lesion_sized_blobs(spacing, direction):
    # A grid finer than 0.49 x 0.49 x 0.8 mm loses single voxels by nature; 2-3 mm blobs must survive.
    shape = (31, 24, 26)
    mask = np.zeros(shape, np.float32)
    mask[8:17, 5:10, 6:11] = 1
    mask[20:28, 14:19, 15:20] = 1
    scan = make_image(brain_like(shape) + 20.0, spacing, direction=direction)
    pre = preprocess(scan)
    back = sitk.GetArrayFromImage(pre.to_original(pre.from_original(make_image(mask, spacing,
                                  direction=direction), "nearest"), "nearest"))
    dice = 2 * (back * mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.9


def test_processing_grid_covers_the_same_field_of_view():
    grid = Geometry((10, 20, 5), (1.0, 0.5, 4.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    new = resampled_grid(grid, (0.5, 0.5, 0.8))
    assert new.size == (20, 20, 25)
    # first voxel edge stays at -half the old voxel: new origin = -s/2 + t/2 along each axis
    np.testing.assert_allclose(new.origin, (-0.25, 0.0, -1.6))


def test_reorientation_puts_axes_in_canonical_order():
    shape = (12, 30, 20)
    scan = make_image(brain_like(shape), (0.8, 0.49, 0.49), direction=PERMUTED)
    pre = preprocess(scan)
    np.testing.assert_allclose(np.array(pre.grid.direction).reshape(3, 3), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(pre.grid.spacing, DEFAULT_TARGET_SPACING)


def test_nan_is_background_and_foreground_is_z_scored():
    array = brain_like((16, 30, 30))
    array[0] = np.nan                    # an edge shell of NaNs, as in some VALDO scans
    array[8, 15, 15] = np.inf
    pre = preprocess(make_image(array, DEFAULT_TARGET_SPACING), crop_margin=0)
    assert np.isfinite(pre.array).all()
    assert not pre.resampled
    values = pre.array[pre.foreground]
    assert abs(values.mean()) < 1e-4 and abs(values.std() - 1) < 1e-3
    assert np.all(pre.array[~pre.foreground] == 0)


def test_crop_keeps_all_foreground_and_margin():
    array = np.zeros((20, 40, 40), np.float32)
    array[5:10, 10:30, 12:20] = 50 + np.arange(5 * 20 * 8).reshape(5, 20, 8) % 7
    pre = preprocess(make_image(array, DEFAULT_TARGET_SPACING), crop_margin=2)
    assert pre.array.shape == (5 + 4, 20 + 4, 8 + 4)
    assert pre.foreground.sum() == 5 * 20 * 8
    full = pre.uncrop(pre.foreground.astype(np.uint8))
    assert full.shape == (20, 40, 40) and full.sum() == 5 * 20 * 8



@pytest.mark.parametrize("spacing,direction", [((1.0, 1.0, 3.0), np.eye(3)), ((1.0, 1.0, 4.0), rotation(20, -10, 35)),
                                               ((0.8, 1.1, 0.49), PERMUTED)])
def test_resampling_only_the_brains_box_equals_cropping_the_whole_resampled_grid(spacing, direction):
    """The B-spline runs on the foreground's box of the processing grid only: the same voxel centres, so the
    same values as resampling the whole grid and cropping."""
    array = np.zeros((14, 40, 44), np.float32)
    array[3:11, 8:30, 10:40] = brain_like((8, 22, 30))
    image = make_image(array, spacing, (3.0, -20.0, 7.0), direction)
    pre = preprocess(image)
    oriented = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "LPS")
    whole = sitk.GetArrayFromImage(pre.grid.resample(oriented, "bspline"))[pre.crop]
    fg = whole[pre.foreground].astype(np.float64)
    expected = np.where(pre.foreground, (whole - fg.mean()) / fg.std(), 0)
    assert pre.resampled and pre.array.shape == whole.shape and pre.array.size < 0.9 * np.prod(pre.grid.shape)
    np.testing.assert_allclose(pre.array, expected, atol=1e-5)

def test_to_original_refuses_wrong_shape():
    pre = preprocess(make_image(brain_like((10, 20, 20)), DEFAULT_TARGET_SPACING))
    with pytest.raises(ValueError, match="shape"):
        pre.to_original(np.zeros((3, 3, 3), np.float32))


def test_voxel_world_mapping_round_trip():
    scan = make_image(brain_like((13, 37, 41)), (0.9, 0.7, 3.1), (3.0, -5.0, 7.0), rotation(10, 0, 30))
    pre = preprocess(scan)
    voxels = np.array([[0, 0, 0], [5, 7, 9], [12.5, 3.25, 8]])
    np.testing.assert_allclose(pre.world_to_voxel(pre.voxel_to_world(voxels)), voxels, atol=1e-9)
    # the centre of input voxel (x=4, y=9, z=6) maps onto the same physical point
    point = scan.TransformIndexToPhysicalPoint((4, 9, 6))
    np.testing.assert_allclose(pre.voxel_to_world(pre.world_to_voxel(point)), point, atol=1e-9)
