"""Segmentation U-Net for 32x32x24 patches around each confirmed candidate.

Two conv-BN-leaky-ReLU blocks (3x3x3, padded) per resolution in both paths, strided-convolution downsampling,
transposed-convolution upsampling, skip connections by concatenation, 32 features doubling per level
(32, 64, 128, 256 at 32x32x24, 16x16x12, 8x8x6, 4x4x3). Output: 2-class logits per voxel (background, CMB).
Tensor layout is (N, 1, z, y, x).
"""

import torch
from torch import nn

from .layers import LEAKY_SLOPE, conv_block

PATCH_SIZE = (24, 32, 32)   # z, y, x


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv_block(in_ch, out_ch, 3, padding=1), conv_block(out_ch, out_ch, 3, padding=1))


class SegmentationUNet(nn.Module):
    patch_size = PATCH_SIZE

    def __init__(self, base_features: int = 32, levels: int = 4):
        super().__init__()
        features = [base_features * 2**i for i in range(levels)]
        self.encoders = nn.ModuleList([double_conv(1, features[0])])
        self.downs = nn.ModuleList()
        for f_in, f_out in zip(features[:-1], features[1:]):
            self.downs.append(nn.Sequential(
                nn.Conv3d(f_in, f_in, 2, stride=2, bias=False), nn.BatchNorm3d(f_in),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True)))
            self.encoders.append(double_conv(f_in, f_out))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for f_low, f_high in zip(features[::-1][:-1], features[::-1][1:]):
            self.ups.append(nn.ConvTranspose3d(f_low, f_high, 2, stride=2))
            self.decoders.append(double_conv(2 * f_high, f_high))
        self.head = nn.Conv3d(features[0], 2, 1)

    def forward(self, x):
        skips = [self.encoders[0](x)]
        for down, encoder in zip(self.downs, self.encoders[1:]):
            skips.append(encoder(down(skips[-1])))
        y = skips.pop()
        for up, decoder in zip(self.ups, self.decoders):
            y = decoder(torch.cat([up(y), skips.pop()], dim=1))
        return self.head(y)
