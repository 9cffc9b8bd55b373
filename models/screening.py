"""Screening network (Chen & Dou, Table 1): a 3D fully convolutional classifier of 20x20x16 patches.

Layer (kernel x, y, z -> channels)        output for a 20x20x16 patch (x, y, z)
  C1 (BN) 5x5x3 -> 64                     16x16x14
  C2 (BN) 5x5x3 -> 64                     12x12x12
  M1 max-pool 2x2x2, stride 2             6x6x6
  C3 (BN) 3x3x3 -> 128                    4x4x4
  C4 (BN) 3x3x3 -> 128                    2x2x2
  C5 2x2x2 -> 256                         1x1x1
  C6 1x1x1 -> 2                           1x1x1   (logits: background, CMB)

Every layer is a convolution or pooling without padding, so applied to a whole volume it yields the score of every
patch whose start is a multiple of the pooling stride (2): score[i, j, k] is the class logits of the patch
starting at input voxel (2i, 2j, 2k) (torch order z, y, x). Tensor layout is (N, 1, z, y, x).

The net splits at the pooling: `local_features` (C1, C2, M1) maps any region to pooled features, one per pair of
input voxels, and `head` (C3-C6) maps a 6x6x6 window of pooled features to one score. Score (i, j, k) reads the
pooled features (i..i+5, j..j+5, k..k+5), so the expensive C1-C2 can run once per pooled voxel in independent
blocks (see ThreeStagePipeline.screen) and give the same scores as the whole-volume FCN.
"""

from torch import nn

from .layers import LEAKY_SLOPE, conv_block

PATCH_SIZE = (16, 20, 20)   # z, y, x
STRIDE = 2
POOLED_WINDOW = 6           # pooled features one score reads along each axis
# (4, 8, 8): input voxels C1-C2 consume beyond the 2 per pooled feature they produce
LOCAL_HALO = tuple(p - STRIDE * POOLED_WINDOW for p in PATCH_SIZE)


class ScreeningFCN(nn.Module):
    patch_size = PATCH_SIZE
    stride = STRIDE
    pooled_window = POOLED_WINDOW
    local_halo = LOCAL_HALO
    LOCAL_LAYERS = 3            # C1, C2 and the pooling

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(1, 64, (3, 5, 5)),
            conv_block(64, 64, (3, 5, 5)),
            nn.MaxPool3d(2, stride=STRIDE),
            conv_block(64, 128, (3, 3, 3)),
            conv_block(128, 128, (3, 3, 3)),
            nn.Conv3d(128, 256, 2),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv3d(256, 2, 1),
        )

    def forward(self, x):
        return self.features(x)

    def local_features(self, x):
        """C1-C2 and pooling: (N, 64, (z - 4) // 2, (y - 8) // 2, (x - 8) // 2)."""
        return self.features[: self.LOCAL_LAYERS](x)

    def head(self, pooled):
        """C3-C6: the logits of every 6x6x6 window of pooled features."""
        return self.features[self.LOCAL_LAYERS:](pooled)

    @staticmethod
    def output_size(input_size: int, patch: int) -> int:
        """Score voxels along an axis of `input_size` voxels (patch length `patch` on that axis)."""
        return max(0, (input_size - patch) // STRIDE + 1)
