"""Which torch device a method runs on."""

from __future__ import annotations

import logging

import torch

from .errors import CaseError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda:  # a CUDA build without a usable GPU: say so, since CPU is many times slower
            log.warning("torch %s is built for CUDA %s but sees no usable GPU (none passed to the container, or "
                        "an NVIDIA driver too old for this CUDA); running on CPU", torch.__version__, torch.version.cuda)
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CaseError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)
