"""Defaults of the methods' options that the command line shows, in a leaf module so that `--help` needs no torch.

nnU-Net's inference defaults were chosen by measurement (docs/methods.md, "The nnU-Net v2 baseline"): tile step 0.5
(nnU-Net's own) and no test-time mirroring (8 network evaluations per tile, more than the whole three-stage pipeline
costs on CPU).
"""

NNUNET_TILE_STEP = 0.5
NNUNET_MIRRORING = False

# The three-stage networks' arithmetic (docs/results.md, "Speed"). auto, the command line's default: bfloat16 on a CPU
# with bfloat16 instructions (the same masks on the simulated hold-out, 1.6x faster), float32 elsewhere (emulated
# bfloat16 is slower; on GPUs it is unmeasured). float16 and tf32 exist on CUDA only.
# int8 (OpenVINO on a CPU only, opt-in) quantizes the heavy convolutions with ranges calibrated for the weights.
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "tf32", "int8")
CUDA_ONLY_PRECISIONS = ("float16", "tf32")

# Where the three-stage networks run (docs/results.md, "Speed"). auto, the command line's default: OpenVINO on a CPU
# when it is installed (about 1.5x faster end to end there, same masks; float32, bfloat16 and int8), torch
# everywhere else (CUDA, float16, tf32).
RUNTIMES = ("auto", "torch", "openvino")

# The three-stage networks' batch norms: as trained (default), or corrected on each scan for screening
# and discrimination (test-time adaptation, core/adaptation.py; opt-in: no gain in its pilot, docs/training.md).
BATCH_NORM = ("trained", "scan")

# grand-challenge's invoke mode: the port its platform calls /health and /invoke on
INVOKE_PORT = 4743
