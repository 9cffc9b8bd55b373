"""A stream of simulated regions that never runs out: region i of a stream is a function of (seed, i) alone.

Worker processes render regions ahead of the trainer (a bounded number in flight), and the trainer takes them in
index order, so a run is deterministic per seed whatever the workers' timing, and a resumed run continues at the
index its checkpoint recorded. Each region draws its profile and grid from the mixtures below (never the OOD
profile's held-out settings: `PROFILE_MIX` names only "standard" and "randomised").
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..core.preprocess import DEFAULT_TARGET_SPACING

log = logging.getLogger("valdocmb.train")

PROFILE_MIX = {"standard": 0.35, "randomised": 0.65}
# the three VALDO cohorts' grids and random in-between protocols (as valdocmb-synth --grid mix)
GRID_MIX = {"rss": 0.3, "sabre": 0.2, "alfa3": 0.15, "alfa4": 0.1, "random": 0.25}


@dataclass
class StreamedRegion:
    index: int
    volume: np.ndarray        # float16 (z, y, x), z-scored
    label: np.ndarray         # uint8
    foreground: np.ndarray    # bool
    sites: list               # (centre voxel, kind) of mimics
    meta: dict


def region_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_region(seed: int, index: int, target_spacing=DEFAULT_TARGET_SPACING) -> StreamedRegion:
    """Region `index` of stream `seed`: its profile and grid drawn from the mixtures, then simulated."""
    from ..synth.region import simulate_region
    from ..synth.simulate import PROFILES

    for attempt in range(5):  # a subject drawn out of the field of view draws again, from a seed of its own
        case_seed = region_seed(seed, index) if attempt == 0 else region_seed(seed * 7919 + attempt, index)
        rng = np.random.default_rng(case_seed)
        profile = list(PROFILE_MIX)[rng.choice(len(PROFILE_MIX), p=list(PROFILE_MIX.values()))]
        grid = list(GRID_MIX)[rng.choice(len(GRID_MIX), p=list(GRID_MIX.values()))]
        try:
            region = simulate_region(case_seed, grid, target_spacing=tuple(target_spacing), **PROFILES[profile])
            break
        except ValueError as error:
            log.warning("region %d of stream %d: %s; drawing again", index, seed, error)
    else:
        raise RuntimeError(f"region {index} of stream {seed}: five draws missed the brain")
    return StreamedRegion(index, region.volume.astype(np.float16), region.label, region.foreground, region.sites,
                          {**region.meta, "profile": profile})


def _worker_init():
    """One thread per simulation worker: the trainer's threads keep the other cores."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


class RegionStream:
    """Regions start, start + 1, ... of stream `seed`, rendered by `workers` processes (0: in this process),
    at most `ahead` in flight."""

    def __init__(self, seed: int, start: int = 0, workers: int = 1, ahead: int = 8,
                 target_spacing=DEFAULT_TARGET_SPACING):
        self.seed, self.position, self.target_spacing = seed, start, tuple(target_spacing)
        self.ahead = max(1, ahead)
        self._pending: deque = deque()
        self._next_submit = start
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init) if workers > 0 else None)

    def _fill(self) -> None:
        while self._pool and len(self._pending) < self.ahead:
            self._pending.append(self._pool.submit(make_region, self.seed, self._next_submit, self.target_spacing))
            self._next_submit += 1

    def take(self, count: int) -> list[StreamedRegion]:
        regions = []
        for _ in range(count):
            if self._pool is None:
                regions.append(make_region(self.seed, self.position, self.target_spacing))
            else:
                self._fill()
                regions.append(self._pending.popleft().result())
                self._fill()
            self.position += 1
        return regions

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        self._fill()
        return self

    def __exit__(self, *exc):
        self.close()
