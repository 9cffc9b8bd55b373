"""Three-stage CMB detection (Chen & Dou, VALDO 2021): screening FCN -> candidates -> discrimination -> U-Net.

All stages work on the preprocessed volume (`valdocmb.core.preprocess`), in (z, y, x) voxel coordinates of its cropped
processing grid:

1. Screening: the fully convolutional net's scores at the brain's even voxels (C1-C2 in blocks of pooled features,
   the rest per slab; see `screen`). Score voxel (i, j, k) is the CMB probability of the 20x20x16 patch centred at
   voxel (2i, 2j, 2k): the volume is zero-padded by half a patch in front, so patch starts 2i - 8 (z) / 2j - 10
   (y, x) line up with the pooling stride.
2. Candidates: scores >= threshold, greedy non-maximum suppression in a window of +-nms_radius score voxels.
3. Discrimination: each candidate's 24x24x20 neighbourhood, at the centre and translated by +-shift voxels along
   each axis; the mean CMB probability must reach the threshold.
4. Segmentation: the U-Net's probabilities on each survivor's 32x32x24 neighbourhood, averaged where patches
   overlap, mapped back to the input grid (linear interpolation) and thresholded.
5. Lesion rule (`valdocmb.core.lesion_rule`): connected components too faint, too small or too weakly confirmed are
   dropped, with minima chosen on labelled cases and stored with the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from valdocmb.models.discrimination import DiscriminationCNN
from valdocmb.models.screening import ScreeningFCN
from valdocmb.models.segmentation import SegmentationUNet

from . import adaptation, manifest, openvino_runtime
from .defaults import CUDA_ONLY_PRECISIONS, PRECISIONS, RUNTIMES
from .device import (
    CPU_ITEMS_PER_CALL,
    OPENVINO_CANDIDATES_PER_CALL,
    activation_bytes,
    cpu_has_bfloat16,
    cuda_items_per_call,
    resolve_device,
)
from .errors import CaseError
from .lesion_rule import LesionRule, apply_rule, rule_from_manifest
from .logs import timed
from .patches import add_patches, extract_patches
from .preprocess import DEFAULT_TARGET_SPACING, Preprocessed, preprocess
from .result import SegmentationResult
from .weights import digest, load_weights

log = logging.getLogger(__name__)

# MANIFEST.json's entry of the int8 calibration: {"weights": version it was made for, "ranges": {network: [[low,
# high] per convolution]}, how it was made}; written by `python -m valdocmb.bench.int8`
INT8_KEY = "int8_calibration"
# its entry of the batch-norm reference (adaptation.py): {"weights": version, "moments": {network: [per batch norm
# (3, channels) count, sum, sum of squares]}, how it was made}; written by `python -m valdocmb.bench.batch_norm`
BATCH_NORM_KEY = "batch_norm_reference"
# its entry of the candidate budget: {"weights": version, "max_candidates": K, the rule and its evidence}; written by
# `python -m valdocmb.bench.weights_eval --record-budget` only where the budget rule holds on both hold-outs
BUDGET_KEY = "candidate_budget"

WEIGHT_FILES = {
    "screening": "three_stage/screening.pt",
    "discrimination": "three_stage/discrimination.pt",
    "segmentation": "three_stage/segmentation.pt",
}


@contextlib.contextmanager
def cuda_fp32_precision(mode: str):
    """cuDNN convolutions and cuBLAS products in float32 as "ieee" (exact float32) or "tf32" (10-bit mantissa on
    tensor cores); torch's own default lets convolutions use TF32. Restored afterwards, so nnU-Net keeps its own."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul  # type: ignore[attr-defined]  # torch>=2.9
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = mode
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


@dataclass
class ThreeStageConfig:
    screening_threshold: float = 0.1
    nms_radius: int = 2                    # in score voxels (one score voxel = 2 processing voxels)
    max_candidates: int = 2000
    discrimination_threshold: float = 0.5
    discrimination_shift: int = 1          # translations of the centre by +-shift voxels along each axis (0: none)
    segmentation_threshold: float = 0.5
    target_spacing: tuple = DEFAULT_TARGET_SPACING
    screening_block: int = 8               # edge of the blocks of pooled features C1-C2 compute (>= 5)
    batch_size: int | None = None          # items per network call; None: chosen from the device (device.py)
    lesion_rule: LesionRule = field(default_factory=LesionRule)
    precision: str = "float32"             # see PRECISIONS; auto is resolved when the pipeline is built
    runtime: str = "torch"                 # see RUNTIMES; auto is resolved when the pipeline is built
    adapt_batch_norm: bool = False         # batch norms corrected on each scan (adaptation.py)


@dataclass
class Candidate:
    centre: tuple                          # (z, y, x) voxel of the cropped processing grid
    screening_score: float
    discrimination_score: float = math.nan


@dataclass
class Detection:
    """Everything one run produced, on the cropped processing grid (the lesion table uses it)."""

    preprocessed: Preprocessed
    probability: np.ndarray
    candidates: list[Candidate] = field(default_factory=list)
    survivors: list[Candidate] = field(default_factory=list)
    # set by `segment`, on the input grid: the thresholded map's components before the lesion rule, and its verdicts
    components: np.ndarray | None = None
    lesions: list = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)


def blocks_read_by(centre_in_brain: np.ndarray, reach: int, block: int, blocks) -> np.ndarray:
    """Which blocks of pooled features some brain score reads: score s reads pooled s..s + reach on every axis."""
    read = np.zeros(tuple(blocks * block), bool)
    read[tuple(slice(0, s) for s in centre_in_brain.shape)] = centre_in_brain
    for axis in range(3):                             # grow forward by `reach`, one axis at a time (a box)
        grown = read.copy()
        for d in range(1, reach + 1):
            grown[(slice(None),) * axis + (slice(d, None),)] |= read[(slice(None),) * axis + (slice(None, -d),)]
        read = grown
    return np.asarray(read.reshape(blocks[0], block, blocks[1], block, blocks[2], block).any(axis=(1, 3, 5)))


def weights_version(weights_dir: Path) -> str:
    """A short digest of the three networks' weight files: what run.json and cached evaluations refer to."""
    return version_of({name: digest(weights_dir, relative) for name, relative in WEIGHT_FILES.items()})


def version_of(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(digests[name] for name in sorted(digests)).encode()).hexdigest()[:12]


class ThreeStagePipeline:
    def __init__(self, screening: ScreeningFCN, discrimination: DiscriminationCNN, segmentation: SegmentationUNet,
                 device: str | torch.device = "cpu", config: ThreeStageConfig | None = None,
                 int8_ranges: dict | None = None, batch_norm_reference: dict | None = None):
        self.device = resolve_device(device) if isinstance(device, str) else device
        # a copy: resolving precision "auto" below must not rewrite the caller's config
        self.config = replace(config) if config is not None else ThreeStageConfig()
        self.screening = screening.eval().to(self.device)
        self.discrimination = discrimination.eval().to(self.device)
        self.segmentation = segmentation.eval().to(self.device)
        if self.config.precision == "auto":
            self.config.precision = ("bfloat16" if self.device.type == "cpu" and cpu_has_bfloat16() else "float32")
            log.info("precision auto: %s on %s", self.config.precision, self.device)
        if self.config.precision in CUDA_ONLY_PRECISIONS and self.device.type != "cuda":
            log.warning("precision %s needs a CUDA device; running float32 on %s", self.config.precision,
                        self.device)
            self.config.precision = "float32"
        self._int8_ranges = int8_ranges     # per network, every convolution's input range (INT8_KEY)
        if self.config.adapt_batch_norm and self.config.precision == "int8":
            raise CaseError("batch-norm adaptation changes the activations int8 was calibrated on: use it with a "
                            "floating-point precision")
        self._compiled = self._compile(self._resolve_runtime())
        self._batch_norm_reference = batch_norm_reference   # per network, each batch norm's reference moments
        if self.config.adapt_batch_norm and not batch_norm_reference:
            raise CaseError("--batch-norm scan: these weights have no batch-norm reference in their MANIFEST.json "
                            "(make one with `python -m valdocmb.bench.batch_norm --weights DIR --data SCANS`)")
        # the trained batch-norm statistics, restored before each case that adapts them (adaptation.py)
        self._stored_statistics = {name: adaptation.snapshot(getattr(self, name))
                                   for name in ("screening", "discrimination")}
        self._adapted: set[str] = set()
        self.weights_info: dict = {}
        self._item_bytes: dict[str, int] = {}

    def _resolve_runtime(self) -> str:
        """The runtime that will run (`config.runtime` with auto resolved; a request it cannot meet falls back to
        torch with a warning, or fails when OpenVINO is missing)."""
        asked = self.config.runtime
        if asked not in RUNTIMES:
            raise CaseError(f"unknown runtime {asked!r}; one of {', '.join(RUNTIMES)}")
        possible = self.device.type == "cpu" and self.config.precision in (*openvino_runtime.PRECISION_HINTS, "int8")
        if asked == "openvino" and not openvino_runtime.available():
            raise CaseError("runtime openvino: the openvino package is not installed (pip install -r requirements.txt)")
        if asked == "openvino" and not possible:
            log.warning("runtime openvino runs float32, bfloat16 or int8 on a CPU; torch runs %s on %s",
                        self.config.precision, self.device)
        runtime = "openvino" if asked != "torch" and possible and openvino_runtime.available() else "torch"
        if asked == "auto":
            log.info("runtime auto: %s", runtime)
        if self.config.precision == "int8" and runtime != "openvino":
            raise CaseError(f"precision int8 runs on OpenVINO on a CPU, not on {runtime} on {self.device}")
        if self.config.precision == "int8" and not self._int8_ranges:
            raise CaseError("precision int8: these weights have no int8 calibration in their MANIFEST.json (make one "
                            "with `python -m valdocmb.bench.int8 --weights DIR --data SCANS`)")
        self.config.runtime = runtime
        return runtime

    def _compile(self, runtime: str, networks=("screening", "discrimination", "segmentation")) -> dict:
        """The pieces of `networks` as OpenVINO functions (empty for torch). Built from the networks' parameters
        now: a pipeline whose networks change afterwards must compile again (batch-norm adaptation does) or use
        torch (training)."""
        if runtime != "openvino":
            return {}
        threads, precision = torch.get_num_threads(), self.float_precision()
        screening, discrimination = self.screening.features, self.discrimination
        local, tail = ScreeningFCN.LOCAL_LAYERS, DiscriminationCNN.LOCAL_LAYERS
        reach = self.config.discrimination_shift
        z, y, x = (int(v) for v in np.array(DiscriminationCNN.patch_size) + 2 * reach)
        # int8: C2 of screening and of discrimination, about 70 % of their arithmetic. C1 reads the scan itself (one
        # channel, little arithmetic) and stays in floating point, and so do the layers after the pooling: quantized
        # too (C3-C4), they moved the scores enough to change 7 of 10 hold-out masks (docs/results.md, "Speed")
        quantized = self._int8_ranges if self.config.precision == "int8" else None
        s, d = (quantized or {}).get("screening"), (quantized or {}).get("discrimination")
        pieces = {}
        if "screening" in networks:
            pieces["screening_local"] = openvino_runtime.compile_stack(list(screening[:local]), 1, precision, threads,
                                                                       int8=[None, s[1]] if s else None)
            pieces["screening_head"] = openvino_runtime.compile_stack(list(screening[local:]), 64, precision, threads)
        if "segmentation" in networks:
            pieces["segmentation"] = openvino_runtime.compile_unet(self.segmentation, precision, threads)
        if "discrimination" in networks:
            pieces["discrimination"] = openvino_runtime.compile_shifted_classifier(
                list(discrimination.features[:tail]), list(discrimination.features[tail:]),
                [discrimination.classifier], (z, y, x), reach, precision, threads,
                int8=([None, d[1]], []) if d else None)
        return pieces

    def networks_changed(self, *networks: str) -> None:
        """After the parameters or statistics of `networks` changed in place: their OpenVINO pieces again."""
        self._compiled.update(self._compile(self.config.runtime, networks))

    def _adapt(self, network: str, inputs: torch.Tensor | None) -> None:
        """Correct `network`'s batch norms towards the weights' reference on this scan's `inputs` (None: too few,
        the trained statistics stay), then compile it again."""
        restored = network in self._adapted           # _restore_statistics put the trained ones back
        if inputs is None:
            log.info("  batch-norm adaptation: too few items for %s, its trained statistics stay", network)
            self._adapted.discard(network)
            if restored:
                self.networks_changed(network)
            return
        assert self._batch_norm_reference is not None   # checked when the pipeline was built
        adaptation.adapt_to_reference(getattr(self, network), inputs.to(self.device),
                                      self._batch_norm_reference[network])
        self._adapted.add(network)
        self.networks_changed(network)
        log.info("  batch-norm adaptation: %s corrected on %d item(s) of this scan", network, len(inputs))

    def _restore_statistics(self) -> None:
        """The trained statistics back in every network the previous case adapted. Their OpenVINO pieces are compiled
        again by this case's `_adapt`, once, whether it adapts them or not."""
        for network in sorted(self._adapted):
            adaptation.restore(getattr(self, network), self._stored_statistics[network])

    def float_precision(self) -> str:
        """The floating-point arithmetic of what int8 leaves unquantized (the U-Net among it): bfloat16 on a CPU
        that has it, else float32; for the other precisions, the precision itself."""
        if self.config.precision == "int8":
            return "bfloat16" if cpu_has_bfloat16() else "float32"
        return self.config.precision

    def run_piece(self, piece: str, x: torch.Tensor) -> torch.Tensor:
        """screening_local (C1-C2 and pooling), screening_head (C3-C6) or segmentation (the U-Net) on the
        configured runtime. Discrimination has its own two paths (`discriminate`): OpenVINO's returns every shift."""
        if piece in self._compiled:
            return self._compiled[piece](x)
        torch_pieces = {"screening_local": self.screening.local_features, "screening_head": self.screening.head,
                        "segmentation": self.segmentation}
        with self.precision():
            return torch_pieces[piece](x)

    @classmethod
    def from_weights(cls, weights_dir: Path, device: str = "auto", config: ThreeStageConfig | None = None,
                     lesion_rule: bool = True, precision: str = "float32", runtime: str = "torch",
                     batch_norm: str = "trained"):
        """lesion_rule: apply the rule stored with the weights (when no config is given), else keep everything;
        batch_norm: "scan" corrects screening's and discrimination's batch norms on each scan (adaptation.py)."""
        nets = {"screening": ScreeningFCN(), "discrimination": DiscriminationCNN(),
                "segmentation": SegmentationUNet()}
        loaded = {name: load_weights(net, weights_dir, WEIGHT_FILES[name]) for name, net in nets.items()}
        metas = {name: meta for name, (meta, _) in loaded.items()}
        digests = {name: sha for name, (_, sha) in loaded.items()}
        version = version_of(digests)
        stored = manifest.read(weights_dir)
        if config is None:
            config = ThreeStageConfig(lesion_rule=rule_from_manifest(weights_dir) if lesion_rule else LesionRule(),
                                      precision=precision, runtime=runtime,
                                      adapt_batch_norm=batch_norm == "scan")
            # weights trained with another loss score on another scale: they carry the threshold chosen for them
            config.screening_threshold = metas["screening"].get("screening_threshold", config.screening_threshold)
            config.discrimination_threshold = metas["discrimination"].get("discrimination_threshold",
                                                                          config.discrimination_threshold)
            budget = stored.get(BUDGET_KEY) or {}
            if budget.get("weights") == version:          # a budget measured for these weights only
                config.max_candidates = int(budget["max_candidates"])
        spacing = metas["screening"].get("target_spacing")
        if spacing:
            config.target_spacing = tuple(spacing)  # the grid the networks were trained on
        calibration = stored.get(INT8_KEY) or {}
        ranges = calibration.get("ranges") if calibration.get("weights") == version else None   # for these only
        reference = stored.get(BATCH_NORM_KEY) or {}
        moments = ({name: [np.asarray(m, np.float64) for m in layers] for name, layers in reference["moments"].items()}
                   if reference.get("weights") == version else None)
        pipeline = cls(nets["screening"], nets["discrimination"], nets["segmentation"], device, config, ranges,
                       moments)
        pipeline.weights_info = {"folder": str(weights_dir), "version": version, "sha256": digests}
        log.info("three-stage weights from %s on %s", weights_dir, pipeline.device)
        return pipeline

    def precision(self):
        """The networks' arithmetic (`PRECISIONS`): float32 (on CUDA without TF32, so GPU and CPU compute the
        same), bfloat16 under torch's autocast (about 2x on CPUs with bf16 instructions; probabilities move by
        about 1e-3), or on CUDA only TF32 convolutions or float16 autocast."""
        mode = self.float_precision()
        if mode not in PRECISIONS:
            raise CaseError(f"unknown precision {mode!r}; one of {', '.join(PRECISIONS)}")
        if mode in ("bfloat16", "float16"):
            return torch.autocast(self.device.type, dtype=getattr(torch, mode))
        if self.device.type == "cuda":
            return cuda_fp32_precision("tf32" if mode == "tf32" else "ieee")
        return contextlib.nullcontext()

    def items_per_call(self, stage: str) -> int:
        """Blocks, candidates or patches per network call for `stage`. On CUDA with no configured batch size, what
        the free memory holds when the stage runs; otherwise the configured (or CPU default) number of network
        inputs, so a discrimination call takes that many patches, a seventh as many candidates. OpenVINO's one-call
        discrimination takes OPENVINO_CANDIDATES_PER_CALL candidates unless a batch size is configured."""
        if stage == "discrimination" and "discrimination" in self._compiled and not self.config.batch_size:
            return OPENVINO_CANDIDATES_PER_CALL
        if self.config.batch_size or self.device.type != "cuda":
            patches = self.config.batch_size or CPU_ITEMS_PER_CALL
            return max(1, patches // len(self.discrimination_shifts())) if stage == "discrimination" else patches
        return cuda_items_per_call(self.device, self._bytes_per_item(stage))

    def _bytes_per_item(self, stage: str) -> int:
        if stage not in self._item_bytes:
            if stage == "screening":
                shape = (1, *self._screening_block_span())
                size = activation_bytes(self.screening, lambda net, x: net.local_features(x), shape)
            elif stage == "discrimination":               # the shared region's C1-C2 and every shift's tail
                region = (1, *(np.array(DiscriminationCNN.patch_size) + 2 * self.config.discrimination_shift))
                whole = activation_bytes(self.discrimination, lambda net, x: net(x), (1, *DiscriminationCNN.patch_size))
                size = (activation_bytes(self.discrimination, lambda net, x: net.local_features(x), region)
                        + len(self.discrimination_shifts()) * whole)
            else:
                size = activation_bytes(self.segmentation, lambda net, x: net(x), (1, *SegmentationUNet.patch_size))
            self._item_bytes[stage] = size
        return self._item_bytes[stage]

    def _screening_block_span(self) -> np.ndarray:
        """Input voxels (z, y, x) of one block of pooled features."""
        return ScreeningFCN.stride * self.config.screening_block + np.array(ScreeningFCN.local_halo)

    # -- stage 1 ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def screen(self, volume: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
        """CMB probability at every even voxel: score[i, j, k] belongs to the patch centred at (2i, 2j, 2k).

        The same scores as the FCN run over the whole zero-padded volume (tested), computed only where the brain
        needs them. C1-C2 (about 70 % of the arithmetic) run in independent blocks of pooled features, each pooled
        voxel at most once and only in blocks some brain score reads; the head (C3-C6) then runs per slab of
        score rows on the box around that slab's brain. Tiles of the whole FCN would recompute C1-C2 on every
        tile's margin (about 1.6x for 48x96x96-voxel tiles) on top of the non-brain corners of their boxes.
        """
        stride = ScreeningFCN.stride
        reach = ScreeningFCN.pooled_window - 1            # pooled voxels a score reads beyond its own index
        block = self.config.screening_block
        if block < reach:
            raise CaseError(f"screening_block must be at least {reach} pooled voxels, not {block}")
        n = np.array(volume.shape)
        m = -(-n // stride)                               # ceil(n / 2) scores per axis
        centre_in_brain = (foreground if foreground is not None else volume != 0)[::stride, ::stride, ::stride]
        scores = np.zeros(tuple(m), np.float32)
        if not centre_in_brain.any():
            return scores
        blocks = -(-(m + reach) // block)                 # blocks of pooled features per axis
        needed = blocks_read_by(centre_in_brain, reach, block, blocks)
        # score s's patch starts at padded voxel stride * s: half a patch of zeros in front, whole blocks behind
        before = np.array(ScreeningFCN.patch_size) // 2
        padded = np.zeros(tuple(stride * block * blocks + np.array(ScreeningFCN.local_halo)), np.float32)
        padded[tuple(slice(b, b + s) for b, s in zip(before, n))] = volume
        rows = {}                                         # pooled features of block rows k (z), computed once

        def block_row(k):
            if k not in rows:
                rows[k] = self._pooled_block_row(padded, k, np.argwhere(needed[k]), blocks)
            return rows[k]

        for k in range(blocks[0]):
            z0, z1 = k * block, min((k + 1) * block, m[0])
            if z0 >= z1:
                break
            inside = np.argwhere(centre_in_brain[z0:z1].any(0))
            if not len(inside):
                continue
            (y0, x0), (y1, x1) = inside.min(0), inside.max(0) + 1
            pooled = block_row(k)                         # never None: this slab's brain scores read it
            if z1 - z0 + reach > block:                   # this slab reads the first `reach` rows of the next one
                following = block_row(k + 1)
                head = torch.zeros_like(pooled[:, :reach]) if following is None else following[:, :reach]
                pooled = torch.cat([pooled, head], 1)
            for old in [r for r in rows if r < k + 1]:
                del rows[old]
            region = pooled[:, :z1 - z0 + reach, y0:y1 + reach, x0:x1 + reach]
            logits = self.run_piece("screening_head", region[None])[0]
            scores[z0:z1, y0:y1, x0:x1] = torch.softmax(logits.float(), 0)[1].cpu().numpy()
        return scores * centre_in_brain

    def _pooled_block_row(self, padded: np.ndarray, k: int, needed: np.ndarray, blocks):
        """C1-C2 and pooling for the needed (y, x) blocks of block row k: (64, block, y, x) pooled features, zero
        in blocks no brain score reads; None when no block of the row is read."""
        stride, block = ScreeningFCN.stride, self.config.screening_block
        row = None
        span = self._screening_block_span()
        per_call = self.items_per_call("screening")
        for start in range(0, len(needed), per_call):
            chosen = needed[start:start + per_call]
            inputs = np.stack([padded[stride * block * k:stride * block * k + span[0],
                                      stride * block * j:stride * block * j + span[1],
                                      stride * block * i:stride * block * i + span[2]] for j, i in chosen])
            features = self.run_piece("screening_local", torch.from_numpy(inputs)[:, None].to(self.device))
            if row is None:
                row = torch.zeros((features.shape[1], block, blocks[1] * block, blocks[2] * block),
                                  dtype=features.dtype, device=self.device)
            for (j, i), feature in zip(chosen, features):
                row[:, :, block * j:block * (j + 1), block * i:block * (i + 1)] = feature
        return row

    # -- stage 2 ------------------------------------------------------------------------------------------------
    def find_candidates(self, scores: np.ndarray) -> list[Candidate]:
        """Thresholded scores, greedy non-maximum suppression, highest first; centres in processing voxels."""
        cfg = self.config
        above = np.argwhere(scores >= cfg.screening_threshold)
        order = np.argsort(-scores[tuple(above.T)], kind="stable")
        suppressed = np.zeros(scores.shape, bool)
        r = cfg.nms_radius
        candidates = []
        for index in above[order]:
            if suppressed[tuple(index)]:
                continue
            candidates.append(Candidate(tuple(int(v) for v in index * ScreeningFCN.stride),
                                        float(scores[tuple(index)])))
            suppressed[tuple(slice(max(v - r, 0), v + r + 1) for v in index)] = True
            if len(candidates) == cfg.max_candidates:
                log.warning("candidate limit %d reached; lower-scoring candidates dropped", cfg.max_candidates)
                break
        return candidates

    # -- stage 3 ------------------------------------------------------------------------------------------------
    def discrimination_shifts(self) -> np.ndarray:
        s = self.config.discrimination_shift
        shifts = [(0, 0, 0)]
        if s:
            for axis in range(3):
                for sign in (-s, s):
                    shift = [0, 0, 0]
                    shift[axis] = sign
                    shifts.append((shift[0], shift[1], shift[2]))
        return np.array(shifts)

    @torch.inference_mode()
    def discriminate(self, volume: np.ndarray, centres) -> np.ndarray:
        """Mean CMB probability of each centre over its translated neighbourhoods.

        The shifted patches of a candidate overlap almost entirely, and C1-C2 are translation-equivariant: they run
        once on the region covering all of them (the patch grown by the shift on every side), and each shifted
        patch's C2 output is a window of that result. Pooling and the rest run per shift. The same arithmetic as
        classifying each shifted patch alone (tested), for about a fifth of the convolutions.
        """
        centres = np.asarray(centres, int).reshape(-1, 3)
        if len(centres) == 0:
            return np.zeros(0, np.float32)
        shifts = self.discrimination_shifts()
        reach = self.config.discrimination_shift
        region = np.array(DiscriminationCNN.patch_size) + 2 * reach
        per_batch = self.items_per_call("discrimination")
        out = []
        for start in range(0, len(centres), per_batch):
            batch = torch.from_numpy(extract_patches(volume, centres[start:start + per_batch], region))[:, None]
            if "discrimination" in self._compiled:        # OpenVINO: logits shift-major (openvino_runtime)
                logits = self._compiled["discrimination"](batch)
                probs = torch.softmax(logits, 1)[:, 1].numpy().reshape(len(shifts), -1).T
            else:
                with self.precision():
                    local = self.discrimination.local_features(batch.to(self.device))
                    size = np.array(local.shape[2:]) - 2 * reach     # C2 output of one patch
                    windows = [local[:, :, reach + dz:reach + dz + size[0], reach + dy:reach + dy + size[1],
                                     reach + dx:reach + dx + size[2]] for dz, dy, dx in shifts]
                    logits = self.discrimination.classify_local(torch.stack(windows, 1).flatten(0, 1))
                probs = torch.softmax(logits, 1)[:, 1].float().cpu().numpy().reshape(-1, len(shifts))
            out.append(probs.mean(axis=1))
        return np.concatenate(out)

    # -- stage 4 ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def segment_candidates(self, volume: np.ndarray, centres) -> np.ndarray:
        """Averaged U-Net CMB probability around each centre; 0 elsewhere."""
        centres = np.asarray(centres, int).reshape(-1, 3)
        total = np.zeros(volume.shape, np.float32)
        counts = np.zeros(volume.shape, np.float32)
        per_call = self.items_per_call("segmentation")
        for start in range(0, len(centres), per_call):
            batch_centres = centres[start:start + per_call]
            batch = extract_patches(volume, batch_centres, SegmentationUNet.patch_size)
            logits = self.run_piece("segmentation", torch.from_numpy(batch)[:, None].to(self.device))
            probs = torch.softmax(logits, 1)[:, 1].float().cpu().numpy()
            add_patches(total, counts, probs, batch_centres)
        return np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)

    # -- the whole path -----------------------------------------------------------------------------------------
    def detect(self, image: sitk.Image, timings: dict) -> Detection:
        cfg = self.config
        with timed(timings, "preprocess", log):
            pre = preprocess(image, cfg.target_spacing)
        log.info("  processing grid %s voxels", "x".join(map(str, pre.array.shape[::-1])))
        if cfg.adapt_batch_norm:
            self._restore_statistics()
            with timed(timings, "adapt_screening", log):
                self._adapt("screening", adaptation.screening_crops(pre.array, pre.foreground))
        with timed(timings, "screening", log):
            scores = self.screen(pre.array, pre.foreground)
        with timed(timings, "candidates", log):
            candidates = self.find_candidates(scores)
        log.info("  %d candidate(s) at screening threshold %.2f", len(candidates), cfg.screening_threshold)
        if cfg.adapt_batch_norm:
            with timed(timings, "adapt_discrimination", log):
                self._adapt("discrimination", adaptation.discrimination_patches(
                    pre.array, [c.centre for c in candidates], DiscriminationCNN.patch_size))
        with timed(timings, "discrimination", log):
            probs = self.discriminate(pre.array, [c.centre for c in candidates])
            for candidate, p in zip(candidates, probs):
                candidate.discrimination_score = float(p)
            survivors = [c for c in candidates if c.discrimination_score >= cfg.discrimination_threshold]
        log.info("  %d candidate(s) confirmed by discrimination", len(survivors))
        with timed(timings, "segmentation", log):
            probability = self.segment_candidates(pre.array, [c.centre for c in survivors]) * pre.foreground
        return Detection(pre, probability, candidates, survivors)

    def segment(self, image: sitk.Image, timings: dict) -> SegmentationResult:
        """The method interface used by the batch runner: mask, probability and detections on the input grid."""
        return self.segment_with_detection(image, timings)[0]

    def segment_with_detection(self, image: sitk.Image, timings: dict) -> tuple[SegmentationResult, Detection]:
        """`segment`, and the stages' intermediate results (candidates, survivors, components) for analysis."""
        detection = self.detect(image, timings)
        with timed(timings, "to_input_grid", log):
            probability = detection.preprocessed.to_original(detection.probability, "linear")
            mask = sitk.Cast(probability >= self.config.segmentation_threshold, sitk.sitkUInt8)
            mask.CopyInformation(image)
        detections = self._detections(detection)
        result = SegmentationResult(mask, probability, detections)
        with timed(timings, "lesion_rule", log):
            rule = self.config.lesion_rule
            result, detection.components, detection.lesions, detection.kept = apply_rule(result, rule)
        if not rule.is_noop():
            log.info("  %d of %d component(s) kept by the lesion rule", sum(detection.kept), len(detection.kept))
        result.info = {**self.describe(), "candidates": len(detection.candidates),
                       "confirmed": len(detection.survivors), "components": len(detection.kept),
                       "kept": sum(detection.kept)}
        return result, detection

    def _detections(self, detection: Detection) -> list[dict]:
        """The confirmed candidates in world coordinates, with their stage scores."""
        centres = np.array([c.centre for c in detection.survivors], float).reshape(-1, 3)
        world = detection.preprocessed.voxel_to_world(centres)
        # the U-Net segments a survivor's whole patch: a lesion this far from a survivor's centre can be its doing
        spacing_zyx = np.array(self.config.target_spacing[::-1])
        reach_mm = round(float(min(np.array(SegmentationUNet.patch_size) / 2 * spacing_zyx)), 2)
        return [{"world_mm": [round(float(v), 3) for v in w], "screening_score": c.screening_score,
                 "discrimination_score": c.discrimination_score, "reach_mm": reach_mm}
                for c, w in zip(detection.survivors, world)]

    def describe(self) -> dict:
        return {"method": "three-stage", "device": str(self.device), "config": asdict(self.config),
                "weights": self.weights_info}


def load_method(weights_dir: Path, options) -> ThreeStagePipeline:
    """The registry's factory (core.methods): the pipeline from `weights_dir` with a run's MethodOptions."""
    return ThreeStagePipeline.from_weights(weights_dir, options.device, lesion_rule=options.lesion_rule,
                                           precision=options.precision, runtime=options.runtime,
                                           batch_norm=options.batch_norm)
