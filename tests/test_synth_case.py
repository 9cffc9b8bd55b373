"""Whole simulated cases on a small grid: reproducibility, labels, the CLI's VALDO layout."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from valdocmb.synth import __main__ as synth_cli
from valdocmb.synth.simulate import simulate_case

SMALL = {"name": "small", "spacing": (1.5, 1.5, 2.5), "size": (100, 110, 52), "b0_tesla": 3.0, "te_ms": 25.0}
BUSY = dict(cmb_free_fraction=0.0, cmb_mean_extra=6.0, cmb_moment_ppm_mm3=(8.0, 30.0), veins=(2, 4),
            calcifications=(1, 2))


@pytest.fixture(scope="module")
def case():
    return simulate_case(11, SMALL, with_phase=True, **BUSY)


def test_same_seed_reproduces_the_case_bit_for_bit(case):
    again = simulate_case(11, SMALL, with_phase=True, **BUSY)
    for a, b in [(case.image, again.image), (case.label, again.label), (case.phase, again.phase)]:
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert strip(case.meta) == strip(again.meta)
    other = simulate_case(12, SMALL, **BUSY)
    assert not np.array_equal(sitk.GetArrayViewFromImage(other.image), sitk.GetArrayViewFromImage(case.image))


def test_geometry_and_skull_stripping(case):
    image = sitk.GetArrayFromImage(case.image)
    assert case.image.GetSize() == SMALL["size"] and case.image.GetSpacing() == SMALL["spacing"]
    assert case.label.GetSize() == SMALL["size"] and case.label.GetPixelID() == sitk.sitkUInt8
    assert 0.1 < (image > 0).mean() < 0.9        # a brain surrounded by zero background
    assert np.isfinite(image).all()


def test_no_voxel_outside_the_brain_is_labelled(case):
    label = sitk.GetArrayFromImage(case.label)
    image = sitk.GetArrayFromImage(case.image)
    assert label.any()
    assert not np.any(label & (image == 0))


def test_labels_cover_visible_dark_blobs_at_the_recorded_microbleeds(case):
    label = sitk.GetArrayFromImage(case.label)
    image = sitk.GetArrayFromImage(case.image)
    cmbs = [o for o in case.meta["objects"] if o["type"] == "cmb"]
    visible = [o for o in cmbs if o.get("visible")]
    assert visible and case.meta["counts"]["cmb_visible"] == len(visible)
    for obj in visible:
        index = case.label.TransformPhysicalPointToIndex(obj["centre_mm"])
        z, y, x = index[::-1]
        assert label[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any(), obj
    components, n = ndimage.label(label, np.ones((3, 3, 3)))
    brain_level = np.median(image[image > 0])
    for k in range(1, n + 1):
        blob = components == k
        shell = ndimage.binary_dilation(blob, iterations=2) & ~blob & (image > 0)
        assert image[blob].mean() < 0.75 * image[shell].mean()
        assert image[blob].min() < 0.6 * brain_level


def test_sources_of_every_kind_are_recorded(case):
    kinds = {o["type"] for o in case.meta["objects"]}
    assert {"cmb", "vein"} <= kinds
    acquisition = case.meta["acquisition"]
    assert acquisition["b0_tesla"] == 3.0 and acquisition["te_ms"] == 25.0 and acquisition["snr_wm"] > 0
    for obj in case.meta["objects"]:
        assert len(obj["centre_mm"]) == 3 and obj["core_diameter_mm"] > 0


def test_each_microbleed_records_where_the_subject_transform_puts_it_in_mni_space(case):
    """The truth `valdocmb.bench.location` scores against: the same position when replayed from the seed, and a
    microbleed placed in the simulator's infratentorial regions lands in the atlas's infratentorial class."""
    from valdocmb.bench.location import true_mni_ras
    from valdocmb.core.location import region_at

    cmbs = [o for o in case.meta["objects"] if o["type"] == "cmb" and o.get("visible")]
    assert cmbs and all(len(o["mni_ras_mm"]) == 3 for o in cmbs)
    replayed = true_mni_ras({**case.meta, "objects": [{k: v for k, v in o.items() if k != "mni_ras_mm"}
                                                       for o in case.meta["objects"]]})
    assert np.allclose(replayed, [o["mni_ras_mm"] for o in cmbs], atol=0.01)
    for obj in cmbs:
        ras = obj["mni_ras_mm"]
        if obj["region"] in ("brainstem", "cerebellum"):
            assert region_at((-ras[0], -ras[1], ras[2]))["mars_class"] == "infratentorial"


def test_cli_writes_the_valdo_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(synth_cli, "choose_grid", lambda grid, seed: SMALL)
    assert synth_cli.main(["--out", str(tmp_path), "--cases", "2", "--seed", "5", "--start", "7"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"sub-00{i}_space-T2S_{kind}" for i in (7, 8)
                     for kind in ("CMB.nii.gz", "desc-masked_T2S.nii.gz", "sim.json")]
    meta = json.loads((tmp_path / "sub-007_space-T2S_sim.json").read_text())
    assert meta["subject"] == "sub-007" and meta["seed"] == synth_cli.case_seed(5, 7)


def test_cli_parameter_changes_reach_the_simulator_and_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(synth_cli, "choose_grid", lambda grid, seed: SMALL)
    assert synth_cli.main(["--out", str(tmp_path), "--cases", "1", "--set", "veins=[0,0]",
                           "--set", "calcifications=[2,2]", "--set", "snr=[8,9]"]) == 0
    meta = json.loads((tmp_path / "sub-001_space-T2S_sim.json").read_text())
    assert meta["overrides"] == {"veins": [0, 0], "calcifications": [2, 2], "snr": [8, 9]}
    assert meta["counts"]["vein"] == 0 and meta["counts"]["calcification"] == 2


@pytest.mark.parametrize("item", ["nosuch=1", "snr", "snr=[1]", "snr=fast", "cmb_max=[1,2]", "anatomy=3"])
def test_cli_parameter_changes_that_do_not_fit_are_refused(item):
    with pytest.raises(SystemExit, match="--set"):
        synth_cli.parse_overrides([item])
