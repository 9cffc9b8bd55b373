"""Which torch device a method runs on, and how many CPU threads it uses."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

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


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs the container may use by its cgroup quota (docker --cpus, a cluster's limit), rounded up; None if none."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]          # cgroup v2: "200000 100000"
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())        # cgroup v1
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def cpu_threads(requested: int | None = None) -> int:
    """Threads for torch on CPU: the request, else the CPUs this process may run on, within the cgroup quota.
    torch alone counts the host's cores, which oversubscribes a container limited to fewer."""
    import torch

    if requested is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = min(available, cpu_quota() or available)
    torch.set_num_threads(requested)
    return requested
