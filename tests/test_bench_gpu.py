"""The GPU proof's parts that a CPU can check: its refusal without CUDA and its comparison and table."""

import numpy as np

from valdocmb.bench import gpu


def test_without_cuda_it_says_so_and_exits_2(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_masks_are_compared_with_the_cpu_float32_one_voxel_by_voxel():
    reference = np.zeros((4, 4, 4), bool)
    reference[1, 1, 1:3] = True
    mask = np.zeros_like(reference)
    mask[1, 1, 2:4] = True
    row = {"scan": "s", "device": "cuda", "variant": "three-stage:float16", "seconds": 2.0, "load_seconds": 1.0,
           "stages": {"screening": 1.0}, "peak_gpu_mb": 900, "mask_voxels": 2}
    done = gpu.compared(row, mask, reference)
    assert (done["only_here"], done["only_on_cpu"]) == (1, 1)
    cpu = gpu.compared({**row, "device": "cpu", "variant": "three-stage:float32", "peak_gpu_mb": None}, reference, None)
    lines = gpu.table([cpu, done]).splitlines()
    assert lines[2].endswith("| reference |") and lines[3].endswith("| 2 (1 / 1) |")
