"""The three networks on OpenVINO's CPU runtime (`--runtime openvino`).

On the development CPUs (AVX-512 with bfloat16) OpenVINO runs the screening and discrimination convolutions about
1.6x faster than torch's oneDNN path at the same precision (docs/results.md, "Speed"). The networks are
rebuilt here from the torch modules' own parameters with OpenVINO's operation API: convolutions (batch norm folded
in), transposed convolutions, leaky ReLU, max pooling, flatten and linear layers, and the U-Net's skips. No model
conversion tool runs (OpenVINO's converter sends usage telemetry unless told not to; the container has no network
and sends nothing), and nothing is written to disk.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from valdocmb.models.segmentation import SegmentationUNet

log = logging.getLogger(__name__)

# OpenVINO's inference precision hint for each of our precisions on a CPU
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _flatten(modules: Iterable[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for module in modules:
        out.extend(_flatten(module) if isinstance(module, nn.Sequential) else [module])
    return out


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().double().cpu().numpy()


def _constant(array: np.ndarray):
    import openvino.opset13 as ops
    return ops.constant(np.ascontiguousarray(array, np.float32))


Ranges = list[tuple[float, float] | None]   # per convolution in order: its input's int8 range, or None (float)


def _fake_quantized(node, low, high, levels: int):
    import openvino.opset13 as ops
    return ops.fake_quantize(node, _constant(low), _constant(high), _constant(low), _constant(high), levels)


def _graph(modules: list[nn.Module], node, int8: Ranges | None = None):
    """OpenVINO nodes computing `modules` in order from `node` (eval mode: batch norm uses its running
    statistics, dropout is the identity). `int8[k]`, when given, quantizes the k-th convolution: its input to 256
    levels over that range, its weights (batch norm folded in) per output channel, symmetric, to 255 levels;
    OpenVINO's CPU plugin then runs it on 8-bit integer instructions."""
    import openvino.opset1 as ops1
    import openvino.opset13 as ops

    layers = [m for m in _flatten(modules) if not isinstance(m, nn.Dropout)]
    convolutions = 0
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, nn.Conv3d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"{layer}: only ungrouped, zero- or un-padded convolutions are rebuilt")
            weight = _numpy(layer.weight)
            bias = _numpy(layer.bias) if layer.bias is not None else np.zeros(weight.shape[0])
            norm = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(norm, nn.BatchNorm3d):                  # folded into the convolution
                scale = _numpy(norm.weight) / np.sqrt(_numpy(norm.running_var) + norm.eps)
                weight = weight * scale[:, None, None, None, None]
                bias = (bias - _numpy(norm.running_mean)) * scale + _numpy(norm.bias)
                i += 1
            padding = list(layer.padding)
            kernel = _constant(weight)
            quantized = int8[convolutions] if int8 else None
            convolutions += 1
            if quantized is not None:
                reach = np.abs(weight).reshape(len(weight), -1).max(1).reshape(-1, 1, 1, 1, 1)
                kernel = _fake_quantized(kernel, -reach, reach, 255)
                node = _fake_quantized(node, np.float32(quantized[0]), np.float32(quantized[1]), 256)
            node = ops.convolution(node, kernel, list(layer.stride), padding, padding, list(layer.dilation))
            node = ops.add(node, _constant(bias.reshape(1, -1, 1, 1, 1)))
        elif isinstance(layer, nn.ConvTranspose3d):
            if (layer.groups != 1 or layer.padding not in (0, (0, 0, 0)) or layer.dilation not in (1, (1, 1, 1))
                    or layer.output_padding not in (0, (0, 0, 0))):
                raise ValueError(f"{layer}: only plain transposed convolutions are rebuilt")
            node = ops.convolution_backprop_data(node, _constant(_numpy(layer.weight)), list(layer.stride))
            if layer.bias is not None:
                node = ops.add(node, _constant(_numpy(layer.bias).reshape(1, -1, 1, 1, 1)))
        elif isinstance(layer, nn.LeakyReLU):
            node = ops.prelu(node, _constant(np.array([layer.negative_slope])))
        elif isinstance(layer, nn.MaxPool3d):
            kernel, stride = (list(v) if isinstance(v, tuple) else [v] * 3 for v in (layer.kernel_size, layer.stride))
            if layer.padding not in (0, (0, 0, 0)) or layer.dilation not in (1, (1, 1, 1)) or layer.ceil_mode:
                raise ValueError(f"{layer}: only unpadded, undilated, floor-mode pooling is rebuilt")
            node = ops1.max_pool(node, stride, [0, 0, 0], [0, 0, 0], kernel, rounding_type="floor")
        elif isinstance(layer, nn.Flatten):
            node = ops.reshape(node, ops.constant(np.array([0, -1], np.int64)), special_zero=True)
        elif isinstance(layer, nn.Linear):
            node = ops.matmul(node, _constant(_numpy(layer.weight)), False, True)
            if layer.bias is not None:
                node = ops.add(node, _constant(_numpy(layer.bias)[None]))
        else:
            raise ValueError(f"{type(layer).__name__}: no OpenVINO equivalent here")
        i += 1
    return node


def compile_stack(modules: list[nn.Module], channels: int, precision: str, threads: int,
                  spatial: tuple[int, int, int] | None = None,
                  int8: Ranges | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layers `modules` (eval mode) as a function of a float32 (N, channels, z, y, x) tensor, batch and, unless
    `spatial` fixes them, spatial sizes free; it returns a float32 tensor. `precision` is float32 or bfloat16 (the
    layers `int8` does not quantize)."""
    import openvino as ov
    import openvino.opset13 as ops

    shape = [-1, channels, *(spatial if spatial else (-1, -1, -1))]
    parameter = ops.parameter(ov.PartialShape(shape), ov.Type.f32, name="x")
    return _compiled(ov.Model([_graph(modules, parameter, int8)], [parameter], "stack"), precision, threads)


def compile_shifted_classifier(local: list[nn.Module], convolutions: list[nn.Module], classifier: list[nn.Module],
                               region: tuple[int, int, int], shift: int, precision: str, threads: int,
                               int8: tuple[Ranges, Ranges] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Discrimination in one call: `local` (C1-C2) once over (N, 1, *region) candidate regions, then pooling and
    `convolutions` (C3-C4) and `classifier` on the window of each shift of every candidate's C2 output (the region
    less `shift` on every side; the shifts of `ThreeStagePipeline.discrimination_shifts`: none, then -shift and
    +shift along z, y and x). Returns the logits, shift-major: row s * N + n is shift s of candidate n. The windows
    never leave OpenVINO (in torch they are copied out of the shared C2 output). `int8`: the ranges of `local` and
    `convolutions`.

    The -shift and +shift windows along an axis pool with the same parity, and their pooled windows lie `shift`
    pooled rows apart: pooling and the valid convolutions run once on the block covering both (`shift` rows longer
    along that axis), and each shift's output is a slice of it (about a third less arithmetic after C2; the same
    values, since every output reads the same inputs)."""
    import openvino as ov
    import openvino.opset13 as ops

    def cut(node, lo, hi):
        return ops.slice(node, ops.constant(np.array(lo, np.int64)), ops.constant(np.array(hi, np.int64)),
                         ops.constant(np.ones(3, np.int64)), ops.constant(np.array([2, 3, 4], np.int64)))

    parameter = ops.parameter(ov.PartialShape([-1, 1, *region]), ov.Type.f32, name="x")
    features = _graph(local, parameter, int8[0] if int8 else None)
    size = np.array([d.get_length() for d in list(features.get_output_partial_shape(0))[2:]]) - 2 * shift
    ranges = int8[1] if int8 else None
    centre = _graph(convolutions, cut(features, [shift] * 3, shift + size), ranges)
    out = [centre]
    if shift:
        final = np.array([d.get_length() for d in list(centre.get_output_partial_shape(0))[2:]])
        for axis in range(3):
            lo, hi = np.full(3, shift), shift + size
            lo[axis], hi[axis] = 0, 2 * shift + size[axis]              # both shifts' windows along this axis
            both = _graph(convolutions, cut(features, lo, hi), ranges)   # `shift` pooled rows longer there
            for start in (0, shift):                                     # -shift, then +shift
                begin = np.zeros(3, int)
                begin[axis] = start
                out.append(cut(both, begin, begin + final))
    logits = _graph(classifier, ops.concat(out, 0))
    return _compiled(ov.Model([logits], [parameter], "shifted_classifier"), precision, threads)


def compile_unet(net: SegmentationUNet, precision: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`models.segmentation.SegmentationUNet` (its `forward`: encoders with strided down-convolutions, transposed
    up-convolutions, skips concatenated before each decoder, a 1x1x1 head) as a function of (N, 1, z, y, x)."""
    import openvino as ov
    import openvino.opset13 as ops

    parameter = ops.parameter(ov.PartialShape([-1, 1, -1, -1, -1]), ov.Type.f32, name="x")
    skips = [_graph([net.encoders[0]], parameter)]
    for down, encoder in zip(net.downs, net.encoders[1:]):
        skips.append(_graph([encoder], _graph([down], skips[-1])))
    node = skips.pop()
    for up, decoder in zip(net.ups, net.decoders):
        node = _graph([decoder], ops.concat([_graph([up], node), skips.pop()], 1))
    return _compiled(ov.Model([_graph([net.head], node)], [parameter], "unet"), precision, threads)


@functools.cache
def _core():
    """One OpenVINO runtime per process for every network compiled in it."""
    import openvino as ov
    return ov.Core()


def _compiled(model, precision: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    compiled = _core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
                                                      "INFERENCE_NUM_THREADS": threads,
                                                      "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        result = request.infer({0: np.ascontiguousarray(x.detach().float().cpu().numpy())})
        return torch.from_numpy(np.array(result[0], np.float32, copy=True))   # the request reuses its memory

    return run


def input_ranges(modules: list[nn.Module], batches: Iterable[torch.Tensor], margin: float = 1.25) -> list[list[float]]:
    """[low, high] of every convolution's input over `batches` run through `modules` in float32, widened by
    `margin`: values beyond the range are clipped by int8, and a clipped outlier costs more than a coarser step
    (measured: ranges at the 1e-5 quantiles moved pooled features by 0.7 of 9, min-max x 1.25 by 0.09)."""
    stack = nn.Sequential(*_flatten(modules)).eval()
    seen: dict[int, list[float]] = {}
    convolutions = [m for m in stack if isinstance(m, nn.Conv3d)]

    def record(module, inputs):
        k = convolutions.index(module)
        low, high = float(inputs[0].min()), float(inputs[0].max())
        seen[k] = [min(low, seen[k][0]), max(high, seen[k][1])] if k in seen else [low, high]

    hooks = [m.register_forward_pre_hook(record) for m in convolutions]
    try:
        with torch.inference_mode():
            for batch in batches:
                stack(batch.float())
    finally:
        for hook in hooks:
            hook.remove()
    return [[margin * seen[k][0], margin * seen[k][1]] for k in range(len(convolutions))]
