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
"""

from torch import nn

from .layers import LEAKY_SLOPE, conv_block

PATCH_SIZE = (16, 20, 20)   # z, y, x
STRIDE = 2


class ScreeningFCN(nn.Module):
    patch_size = PATCH_SIZE
    stride = STRIDE

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

    @staticmethod
    def output_size(input_size: int, patch: int) -> int:
        """Score voxels along an axis of `input_size` voxels (patch length `patch` on that axis)."""
        return max(0, (input_size - patch) // STRIDE + 1)
