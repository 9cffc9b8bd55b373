"""How long each training path runs: the named schedules of both paths and their `--set NAME=VALUE` overrides.

Torch-free, so that `valdocmb-train --help` lists them without loading the networks. The pool path
(`valdocmb.train.three_stage`, `--data`) counts iterations and samples; the streamed path (`valdocmb.train.streamed`,
from scratch) counts steps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass
class Schedule:
    """Iterations and samples per iteration of each stage (the paper: 150 x 0.2 M, 80 x 0.1 M, 100 x 8 k)."""

    initial_iterations: int
    initial_samples: int
    screening_iterations: int
    screening_samples: int
    discrimination_iterations: int
    discrimination_samples: int
    segmentation_iterations: int
    segmentation_samples: int
    batch_size: int = 64
    segmentation_batch_size: int = 16     # the U-Net needs more, smaller steps than the classifiers
    mining_threshold: float = 0.1
    learning_rate_scale: float = 1.0      # x the stage's base rate (SGD 1e-2, Adam 1e-3); fine-tuning uses less


SCHEDULES = {
    "paper": Schedule(30, 200_000, 150, 200_000, 80, 100_000, 100, 8_000, 128),
    "gpu": Schedule(10, 20_000, 40, 20_000, 30, 10_000, 40, 2_000, 128),
    "cpu": Schedule(4, 2_048, 16, 3_072, 10, 3_072, 12, 384, 64),
    # from given weights (--init): no initial screening model (the given one mines), a tenth of the learning rate
    "finetune": Schedule(1, 64, 8, 2_048, 10, 2_048, 8, 384, 64, learning_rate_scale=0.1),
    "smoke": Schedule(1, 64, 1, 64, 1, 64, 1, 16, 16),
}


@dataclass
class StreamSchedule:
    screening_steps: int
    discrimination_steps: int
    segmentation_steps: int
    screening_crops: int = 4          # 48x64x64 crops per step
    discrimination_sites: int = 16    # sites per step, each seen through `discrimination_shifts` windows
    discrimination_shifts: int = 24
    segmentation_batch: int = 16
    buffer: int = 48                  # regions held at once
    refresh: int = 1                  # new regions per step
    validate_every: int = 100
    patience: int = 5                 # validations without improvement that end a stage ...
    stop_after: float = 0.5           # ... once this share of its steps is done
    # then, from the kept state, this share of the steps with the learning rate going linearly to zero (a stage
    # stopped at half its budget still has most of its learning rate; 0: stop at once)
    cooldown: float = 0.1
    validation_regions: int = 48
    hard_negatives: int = 2048        # only this many hardest background positions per screening batch (0: all)
    # the screening threshold stored with the weights leaves this many false-positive peaks per validation region:
    # about what the pool-trained weights leave at their threshold of 0.1 (5.2), so candidates per scan do not grow
    false_peaks_per_region: float = 5.0
    learning_rate_scale: float = 1.0
    # ablations (issue 31), one factor of the recipe at a time: the share of regions drawn from the standard profile
    # (stream.PROFILE_MIX's 0.35; 1 = standard only), and whether discrimination and U-Net negatives include the
    # hard ones (mined false positives and mimic sites: vessel ends, bends, crossings, calcifications; 0 = random
    # brain points only). The validation regions keep the default mix whatever these say.
    standard_share: float = 0.35
    hard_negative_sites: int = 1

    def profile_mix(self) -> dict[str, float]:
        return {"standard": self.standard_share, "randomised": 1.0 - self.standard_share}


STREAM_SCHEDULES = {
    # what valdocmb-train runs from scratch. Half of each budget is at least 50x the samples the pool-trained
    # weights saw (screening 61 k patches, discrimination 92 k, U-Net 5.4 k): 2,000 x 4 crops x 8,993 positions,
    # 12,000 x 16 sites x 24 windows, 17,000 x 16 patches; after that, a stage ends when validation stops improving
    "full": StreamSchedule(4000, 24000, 34000),
    "hour": StreamSchedule(700, 1000, 600, validate_every=50),
    "smoke": StreamSchedule(2, 2, 2, screening_crops=2, discrimination_sites=4, discrimination_shifts=2,
                            segmentation_batch=4, buffer=2, refresh=1, validate_every=1, patience=2,
                            validation_regions=2),
}


def schedule_with(schedule, overrides: list[str], may_be_zero: tuple = ()):
    """The schedule (any schedule dataclass) with NAME=VALUE overrides (e.g. discrimination_iterations=30); a bad
    one stops with the reason. Values must be positive, or at least zero for the fields in `may_be_zero`."""
    kinds = {f.name: f.type for f in fields(schedule)}
    changes: dict[str, float | int] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in kinds:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(kinds)}")
        try:
            changes[name] = float(value) if kinds[name] in (float, "float") else int(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a number") from None
        if changes[name] < 0 or (changes[name] == 0 and name not in may_be_zero):
            raise SystemExit(f"--set {item!r}: must be positive")
    return replace(schedule, **changes)


def stream_schedule_with(schedule: StreamSchedule, overrides: list[str]) -> StreamSchedule:
    """The schedule with NAME=VALUE overrides (`schedule_with`); hard_negatives=0 counts every position,
    standard_share=0 draws randomised regions only, hard_negative_sites=0 drops the hard negative sites, cooldown=0
    stops a stalled stage at once."""
    changed = schedule_with(schedule, overrides, may_be_zero=("hard_negatives", "standard_share",
                                                              "hard_negative_sites", "cooldown"))
    if changed.standard_share > 1 or changed.cooldown > 1 or changed.hard_negative_sites not in (0, 1):
        raise SystemExit("--set: standard_share and cooldown lie in [0, 1] and hard_negative_sites is 0 or 1")
    return changed
