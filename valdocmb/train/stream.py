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


REGIONS_PER_CASE = 3          # windows of one simulated case (they share its whole-brain pass)


def region_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_case(seed: int, case: int, target_spacing=DEFAULT_TARGET_SPACING,
              profile_mix: dict[str, float] | None = None) -> list[StreamedRegion]:
    """Regions case * REGIONS_PER_CASE ... of stream `seed`: one case, its profile and grid drawn from the
    mixtures (`profile_mix`, default PROFILE_MIX: the same draws whatever its shares, so only the profile
    changes), REGIONS_PER_CASE windows of it."""
    mix = PROFILE_MIX if profile_mix is None else profile_mix
    if set(mix) != set(PROFILE_MIX):
        raise ValueError(f"profile mix {mix}: expected shares of {', '.join(PROFILE_MIX)}")
    from ..synth.region import simulate_regions
    from ..synth.simulate import PROFILES

    for attempt in range(5):  # a subject drawn out of the field of view draws again, from a seed of its own
        case_seed = region_seed(seed, case) if attempt == 0 else region_seed(seed * 7919 + attempt, case)
        rng = np.random.default_rng(case_seed)
        profile = list(PROFILE_MIX)[rng.choice(len(PROFILE_MIX), p=[mix[name] for name in PROFILE_MIX])]
        grid = list(GRID_MIX)[rng.choice(len(GRID_MIX), p=list(GRID_MIX.values()))]
        try:
            regions = simulate_regions(case_seed, grid, REGIONS_PER_CASE, target_spacing=tuple(target_spacing),
                                       **PROFILES[profile])
            break
        except ValueError as error:
            log.warning("case %d of stream %d: %s; drawing again", case, seed, error)
    else:
        raise RuntimeError(f"case {case} of stream {seed}: five draws missed the brain")
    return [StreamedRegion(case * REGIONS_PER_CASE + i, r.volume.astype(np.float16), r.label, r.foreground, r.sites,
                           {**r.meta, "profile": profile, "case": case}) for i, r in enumerate(regions)]


def make_region(seed: int, index: int, target_spacing=DEFAULT_TARGET_SPACING) -> StreamedRegion:
    """Region `index` of stream `seed` alone (its case is simulated whole)."""
    return make_case(seed, index // REGIONS_PER_CASE, target_spacing)[index % REGIONS_PER_CASE]


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
    """Regions start, start + 1, ... of stream `seed`, rendered a case at a time by `workers` processes (0: in this
    process), at most `ahead` cases in flight."""

    def __init__(self, seed: int, start: int = 0, workers: int = 1, ahead: int = 4,
                 target_spacing=DEFAULT_TARGET_SPACING, profile_mix: dict[str, float] | None = None):
        self.seed, self.position, self.target_spacing = seed, start, tuple(target_spacing)
        self.profile_mix = profile_mix
        self.ahead = max(1, ahead)
        self._pending: deque = deque()                 # futures of whole cases, in order
        self._ready: deque = deque()                   # regions of the current case not yet taken
        self._next_case = start // REGIONS_PER_CASE
        self._skip = start % REGIONS_PER_CASE          # a start inside a case drops the case's first regions
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init) if workers > 0 else None)

    def _fill(self) -> None:
        while self._pool and len(self._pending) < self.ahead:
            self._pending.append(self._pool.submit(make_case, self.seed, self._next_case, self.target_spacing,
                                                   self.profile_mix))
            self._next_case += 1

    def _next_case_regions(self) -> list[StreamedRegion]:
        if self._pool is None:
            regions = make_case(self.seed, self._next_case, self.target_spacing, self.profile_mix)
            self._next_case += 1
        else:
            self._fill()
            regions = self._pending.popleft().result()
            self._fill()
        regions, self._skip = regions[self._skip:], 0
        return regions

    def take(self, count: int) -> list[StreamedRegion]:
        regions = []
        for _ in range(count):
            if not self._ready:
                self._ready.extend(self._next_case_regions())
            regions.append(self._ready.popleft())
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
