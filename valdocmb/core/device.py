"""Which torch device a method runs on, how many CPU threads it uses, and how many items a network call takes."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from pathlib import Path

import torch

from .errors import CaseError

log = logging.getLogger(__name__)


# The oldest Linux NVIDIA driver each CUDA major version runs on (NVIDIA's CUDA compatibility guide: minor-version
# compatibility within a major version)
MINIMUM_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def nvidia_driver(version_file: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The host's NVIDIA kernel driver version ("535.183.01"), visible inside a container given a GPU; None without."""
    try:
        text = version_file.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for [\w]+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def driver_problem(driver: str | None, cuda: str | None) -> str | None:
    """Why a GPU is unusable with this torch build, when the driver explains it: too old for the build's CUDA."""
    if not driver or not cuda:
        return None
    needed = MINIMUM_DRIVER.get(int(cuda.split(".")[0]))
    if needed is None or version_tuple(driver) >= version_tuple(needed):
        return None
    return (f"the NVIDIA driver {driver} is older than torch {torch.__version__} (CUDA {cuda}) needs "
            f"({needed} or newer): rebuild the image with a CUDA build this driver runs "
            "(docs/container.md, \"GPU builds and grand-challenge's driver\")")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda:  # a CUDA build without a usable GPU: say so, since CPU is many times slower
            driver = nvidia_driver()
            why = driver_problem(driver, torch.version.cuda)
            if why:
                log.error("running on CPU: %s", why)
            else:
                log.warning("torch %s is built for CUDA %s but sees no usable GPU (%s); running on CPU",
                            torch.__version__, torch.version.cuda,
                            f"NVIDIA driver {driver} loaded" if driver else "none passed to the container?")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        why = driver_problem(nvidia_driver(), torch.version.cuda)
        raise CaseError(f"--device cuda was asked for, but torch sees no CUDA device"
                        f"{': ' + why if why else ' (torch ' + torch.__version__ + ')'}")
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
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())        # cgroup v1
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def cpu_threads(requested: int | None = None) -> int:
    """Threads for torch on CPU: the request, else the CPUs this process may run on, within the cgroup quota.
    torch alone counts the host's cores, which oversubscribes a container limited to fewer."""
    if requested is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = min(available, cpu_quota() or available)
    torch.set_num_threads(requested)
    return requested


def cpu_has_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX): without it torch emulates bfloat16, and
    that is slower than float32."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


CPU_ITEMS_PER_CALL = 64       # larger CPU batches gain nothing: the convolutions are compute-bound there
# ... except OpenVINO's one-call discrimination, whose small per-shift layers gain from more candidates per call
# (example scan, 1,166 candidates: 9 per call 17.0 s, 18 15.9 s, 36 15.2 s, 64 14.7 s, under a training's load)
OPENVINO_CANDIDATES_PER_CALL = 32
MAX_ITEMS_PER_CALL = 4096


def activation_bytes(net: torch.nn.Module, forward, input_shape) -> int:
    """Bytes of every layer's output while `forward(net, x)` runs on one input of `input_shape` (channels first,
    no batch axis), traced on torch's meta device (shapes only, no arithmetic, no memory): an upper bound of the
    memory one item holds during inference."""
    meta = copy.deepcopy(net).to("meta")
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in meta.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            forward(meta, torch.empty((1, *input_shape), device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def cuda_items_per_call(device: torch.device, bytes_per_item: int) -> int:
    """How many items one network call on a CUDA device takes: as many as fit twice in half its free memory
    (cuDNN's workspace and the allocator's slack need room too)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(MAX_ITEMS_PER_CALL, max(1, free // 2 // (2 * bytes_per_item))))
