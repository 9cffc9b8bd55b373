"""Hand-set weights that turn the real architectures into a deterministic dark-spot detector.

Every convolution passes channel 0 through its centre tap (the first one negated, so the leaky ReLU yields
relu(-x): large inside a dark blob, about 0 in normal tissue); batch norms are identities; the final layer turns
channel 0 into the CMB logit gain * value - bias. All other weights are 0.
"""

import torch
from torch import nn

from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.models.segmentation import SegmentationUNet


def _identity_norms(net):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.reset_running_stats()
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _pass_channel(conv, in_channel=0, sign=1.0):
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    centre = tuple(k // 2 for k in conv.kernel_size)
    conv.weight.data[(0, in_channel) + centre] = sign


def _zero(net):
    for p in net.parameters():
        nn.init.zeros_(p)
    _identity_norms(net)


@torch.no_grad()
def dark_spot_screening(gain=1.0, bias=8.0) -> ScreeningFCN:
    net = ScreeningFCN()
    _zero(net)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    for i, conv in enumerate(convs[:-1]):
        _pass_channel(conv, sign=-1.0 if i == 0 else 1.0)
    convs[-1].weight.data[1, 0] = gain
    convs[-1].bias.data[1] = -bias
    return net.eval()


@torch.no_grad()
def dark_spot_discrimination(gain=2.0, bias=12.0) -> DiscriminationCNN:
    net = DiscriminationCNN()
    _zero(net)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    for i, conv in enumerate(convs):
        _pass_channel(conv, sign=-1.0 if i == 0 else 1.0)
    fc1, fc2 = [m for m in net.modules() if isinstance(m, nn.Linear)]
    fc1.weight.data[0, :64] = 1.0 / 8   # channel 0's 4x4x4 map: sum / 8, about its mean over the central blob
    fc2.weight.data[1, 0] = gain
    fc2.bias.data[1] = -bias
    return net.eval()


@torch.no_grad()
def dark_spot_segmentation(gain=2.0, bias=12.0) -> SegmentationUNet:
    net = SegmentationUNet()
    _zero(net)
    first, second = [m for m in net.encoders[0].modules() if isinstance(m, nn.Conv3d)]
    _pass_channel(first, sign=-1.0)
    _pass_channel(second)
    # The last decoder sees [upsampled path, skip]: pass the skip's channel 0 through.
    skip_channel = net.decoders[-1][0][0].in_channels // 2
    first, second = [m for m in net.decoders[-1].modules() if isinstance(m, nn.Conv3d)]
    _pass_channel(first, in_channel=skip_channel)
    _pass_channel(second)
    net.head.weight.data[1, 0] = gain
    net.head.bias.data[1] = -bias
    return net.eval()
