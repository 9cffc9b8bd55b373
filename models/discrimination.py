"""Discrimination network (Chen & Dou, Table 2): classifies a 24x24x20 patch as CMB or mimic.

Layer (kernel x, y, z -> channels)        output for a 24x24x20 patch (x, y, z)
  C1 (BN) 5x5x3 -> 64                     20x20x18
  C2 (BN) 5x5x3 -> 64                     16x16x16
  M1 max-pool 2x2x2, stride 2             8x8x8
  C3 (BN) 3x3x3 -> 128                    6x6x6
  C4 (BN) 3x3x3 -> 128                    4x4x4
  FC1 512, FC2 2                          (logits: mimic, CMB)
Tensor layout is (N, 1, z, y, x).
"""

from torch import nn

from .layers import LEAKY_SLOPE, conv_block

PATCH_SIZE = (20, 24, 24)   # z, y, x


class DiscriminationCNN(nn.Module):
    patch_size = PATCH_SIZE

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(1, 64, (3, 5, 5)),
            conv_block(64, 64, (3, 5, 5)),
            nn.MaxPool3d(2, stride=2),
            conv_block(64, 128, (3, 3, 3)),
            conv_block(128, 128, (3, 3, 3)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4 * 4, 512),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 2),
        )

    def forward(self, x):
        return self.classifier(self.features(x))

    # C1-C2 are valid convolutions with batch norm and leaky ReLU: translation-equivariant, so they can run once on
    # a region covering several shifted patches (see ThreeStagePipeline.discriminate); the rest starts at pooling.
    LOCAL_LAYERS = 2

    def local_features(self, x):
        """C1-C2 of any region at least a patch large: (N, 64, z - 4, y - 8, x - 8)."""
        return self.features[: self.LOCAL_LAYERS](x)

    def classify_local(self, local):
        """Pooling, C3-C4 and the classifier on the 16x16x16 C2 output of one patch."""
        return self.classifier(self.features[self.LOCAL_LAYERS:](local))
