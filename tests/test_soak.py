"""Soak: 200 small cases with faults injected (corrupt and truncated scans, a full disk for one write, SIGKILL at
random moments, each followed by --resume) end exactly as one undisturbed run does. A few minutes on two cores."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.core import imageio, run

from conftest import brain_like, make_image

pytestmark = pytest.mark.slow  # minutes of training, simulation or a soak: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]
CASES, BAD, KILLS = 200, 12, 3
OPTIONS = ["--location", "off", "--device", "cpu"]


def summary(out: Path) -> dict[str, dict]:
    import csv

    return {row["case"]: row for row in csv.DictReader(open(out / "summary.csv"))}


def test_200_cases_with_faults_kills_and_resumes_end_as_an_undisturbed_run(tmp_path, monkeypatch):
    rng = np.random.default_rng(2026)
    inp, ref, out = tmp_path / "input", tmp_path / "undisturbed", tmp_path / "disturbed"
    inp.mkdir()
    bad = {f"case{i:03d}" for i in rng.choice(CASES, BAD, replace=False)}
    for i in range(CASES):
        name = f"case{i:03d}"
        path = inp / f"{name}.nii.gz"
        sitk.WriteImage(make_image(brain_like((20, 40, 36), seed=i), (0.5, 0.5, 0.8)), str(path))
        if name in bad:  # half of them garbage, half cut short
            data = path.read_bytes()
            path.write_bytes(b"\x1f\x8b garbage" if i % 2 else data[: len(data) // 2])
    monkeypatch.setenv("CMB_PRECISION", "float32")
    assert run.main(["--input", str(inp), "--output", str(ref), *OPTIONS]) == 1

    kills = []
    for seconds in rng.uniform(5.0, 12.0, KILLS):   # SIGKILL mid-run, then the same command with --resume
        process = subprocess.Popen([sys.executable, str(ROOT / "process.py"), "--input", str(inp), "--output",
                                    str(out), "--resume", *OPTIONS], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={**os.environ, "CMB_PRECISION": "float32"})
        time.sleep(seconds)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills.append(round(float(seconds), 1))
        process.wait()
    written_before = len(list(out.glob("*_CMB.nii.gz")))

    real_fsync, failed = imageio.os.fsync, []

    def full_disk_once(fd):
        if not failed:
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(imageio.os, "fsync", full_disk_once)
    assert run.main(["--input", str(inp), "--output", str(out), "--resume", *OPTIONS]) == 1
    monkeypatch.setattr(imageio.os, "fsync", real_fsync)
    assert failed, "no write met the full disk"
    assert run.main(["--input", str(inp), "--output", str(out), "--resume", *OPTIONS]) == 1   # the bad scans

    good = sorted(f"case{i:03d}" for i in range(CASES) if f"case{i:03d}" not in bad)
    assert sorted(p.name for p in out.glob("*_CMB.nii.gz")) == [f"{name}_CMB.nii.gz" for name in good]
    for name in good:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_CMB.nii.gz"))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(ref / f"{name}_CMB.nii.gz"))))
    rows = summary(out)
    assert {name for name, row in rows.items() if row["status"] == "failed"} == bad
    assert all(f"{name}.nii.gz" in rows[name]["error"] for name in bad)
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob("*.partial"))
    print(f"soak: {CASES} cases, {BAD} corrupt, {len(kills)} SIGKILLs at {kills} s, {written_before} masks before "
          f"the full-disk run, 1 full-disk write, masks identical to the undisturbed run")
