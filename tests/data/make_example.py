"""Writes the tiny scoring example under tests/data/example (reference masks and a prediction folder).

    python tests/data/make_example.py
"""

from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).parent / "example"


def write(array, path, spacing=(0.488, 0.488, 0.8)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def main():
    shape = (24, 48, 48)
    ref1 = np.zeros(shape)
    ref1[10:13, 20:25, 20:25] = 1          # a ~2.4 mm microbleed
    ref1[4:6, 8:11, 30:33] = 1             # a small one
    pred1 = np.zeros(shape)
    pred1[10:13, 21:25, 20:24] = 1         # found, slightly smaller
    pred1[18:20, 40:42, 10:12] = 1         # a false positive
    ref2 = np.zeros(shape)                 # a subject without microbleeds, predicted empty
    write(ref1, HERE / "reference" / "sub-001_space-T2S_CMB.nii.gz")
    write(ref2, HERE / "reference" / "sub-002_space-T2S_CMB.nii.gz")
    write(pred1, HERE / "prediction" / "images" / "sub-001_space-T2S_prediction.nii.gz")
    write(ref2, HERE / "prediction" / "images" / "sub-002_space-T2S_prediction.nii.gz")


if __name__ == "__main__":
    main()
