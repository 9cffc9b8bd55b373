"""Writes the example shipped under tests/data/example: one simulated scan (VALDO layout) and its reference.

    python tests/data/make_example.py

A 128 x 144 x 36 grid of 1 x 1 x 3 mm (3 T, TE 23 ms, like the ALFA cohort) centred on the brain, small enough for
the quick start to run on a CPU in well under a minute, with several visible microbleeds and the usual mimics.
"""

from pathlib import Path

import SimpleITK as sitk

from valdocmb.synth.simulate import simulate_case

HERE = Path(__file__).parent / "example"
GRID = {"name": "example", "spacing": (1.0, 1.0, 3.0), "size": (128, 144, 36), "b0_tesla": 3.0, "te_ms": 23.0}
SEED = 2024


def main():
    case = simulate_case(SEED, GRID, cmb_free_fraction=0.0, cmb_mean_extra=4.0, cmb_moment_ppm_mm3=(4.0, 30.0))
    (HERE / "input").mkdir(parents=True, exist_ok=True)
    (HERE / "reference").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(case.image, str(HERE / "input" / "sub-001_space-T2S_desc-masked_T2S.nii.gz"), True)
    sitk.WriteImage(case.label, str(HERE / "reference" / "sub-001_space-T2S_CMB.nii.gz"), True)
    print(case.meta["counts"])


if __name__ == "__main__":
    main()
