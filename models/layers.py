"""Building blocks shared by the three networks. Leaky ReLU slope 0.01 as in the paper's tables."""

from torch import nn

LEAKY_SLOPE = 0.01


def conv_block(in_ch: int, out_ch: int, kernel, batch_norm: bool = True, padding=0) -> nn.Sequential:
    """Valid (unpadded by default) 3D convolution, optional batch norm, leaky ReLU."""
    layers: list[nn.Module] = [nn.Conv3d(in_ch, out_ch, kernel, padding=padding, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm3d(out_ch))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return nn.Sequential(*layers)
