"""Domain randomisation: anatomy sources, the randomised and out-of-distribution profiles, each artefact's effect,
hard-negative crops at vessel ends, and what the hold-out benchmark puts each false positive down to."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from valdocmb.bench.randomisation import cause_of, false_positive_causes, object_distance
from valdocmb.synth import __main__ as synth_cli
from valdocmb.synth import anatomy, simulate
from valdocmb.synth.simulate import OOD_HELD_OUT, PROFILES, simulate_case
from valdocmb.train.samples import case_pool

from conftest import make_image

SMALL = {"name": "small", "spacing": (1.5, 1.5, 2.5), "size": (100, 110, 52), "b0_tesla": 3.0, "te_ms": 25.0}
# every randomisation at a setting that shows, on the small grid
LOUD = {**PROFILES["randomised"], "cmb_free_fraction": 0.0, "cmb_mean_extra": 4.0, "cmb_moment_ppm_mm3": (8.0, 30.0),
        "atrophy_mm": (2.0, 2.0), "wmh": (6, 6), "gibbs": (0.2, 0.2), "ghosts": (0.1, 0.1), "slice_overlap": (0.4, 0.4),
        "mask_edges": (1.0, 1.0), "vein_models": ["tortuous"], "veins": (6, 6), "flow_voids": (3, 3),
        "calcifications": (2, 2), "calcification_elsewhere": 1.0, "anatomy_sources": ["robex"]}


@pytest.fixture(scope="module")
def loud():
    return simulate_case(5, SMALL, **LOUD)


@pytest.mark.parametrize("source", list(anatomy.ANATOMY_SOURCES))
def test_every_anatomy_source_gives_a_brain_on_the_mni_grid(source):
    reference, gm, wm, brain = anatomy.source_maps(source)
    mni_brain = anatomy.source_maps("mni2009a")[3] > 0.5
    inside = brain > 0.5
    litres = inside.sum() * np.prod(reference.GetSpacing()) / 1e6
    assert 1.2 < litres < 2.0
    assert 2 * (inside & mni_brain).sum() / (inside.sum() + mni_brain.sum()) > 0.9  # registered onto MNI
    assert 0.3 < gm[inside].mean() < 0.65 and 0.15 < wm[inside].mean() < 0.5
    if source != "mni2009a":  # probabilities inside its own brain, and its own shape, not MNI's
        assert np.all(gm + wm <= 1.0 + 1e-2) and not np.any((gm + wm)[~inside])
        assert np.abs(gm - anatomy.source_maps("mni2009a")[1]).mean() > 0.05


def test_the_tissue_mixture_finds_three_classes_dark_to_bright():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 5, n) for m, n in ((40, 2000), (100, 5000), (150, 4000))])
    means, sds, weights = anatomy.tissue_mixture(rng.permutation(values))
    np.testing.assert_allclose(means, [40, 100, 150], atol=2)
    np.testing.assert_allclose(weights, [2 / 11, 5 / 11, 4 / 11], atol=0.02)


def test_a_range_of_one_value_and_a_list_of_one_name_draw_nothing():
    """So the standard profile's random stream, and every earlier case, stay as they were."""
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    assert simulate._drawn(rng, (0.0, 0.0)) == 0.0 and simulate._drawn(rng, (4, 4), integer=True) == 4
    assert simulate._one_of(rng, ["mni2009a"]) == "mni2009a"
    assert rng.bit_generator.state == state
    assert 1.0 <= simulate._drawn(rng, (1.0, 2.0)) <= 2.0 and rng.bit_generator.state != state


def test_the_out_of_distribution_settings_are_never_used_in_training():
    train, ood = PROFILES["randomised"], PROFILES["ood"]
    for name in ("anatomy_sources", "vein_models"):
        assert not set(train[name]) & set(ood[name]), name
    for name in ("iron_r2star_per_s", "bias_amplitude"):
        assert train[name][1] <= ood[name][0], name
    assert set(OOD_HELD_OUT) <= set(ood)


def test_a_randomised_case_records_what_was_drawn(loud):
    meta = loud.meta
    assert meta["anatomy"]["source"] == "robex"
    drawn = meta["randomisation"]
    assert drawn["atrophy_mm"] == 2.0 and drawn["wmh"] == 6 and drawn["gibbs"] == 0.2 and drawn["ghosts"] == 0.1
    assert 2 <= drawn["bias_order"] <= 6 and drawn["mask_edge_voxels"]["kept_outside"] > 0
    veins = [o for o in meta["objects"] if o["type"] == "vein"]
    assert len(veins) == 6 and all(o["model"] == "tortuous" for o in veins)
    for vein in veins:
        assert len(vein["segments_mm"]) >= 3 and len(vein["ends_mm"]) >= 2
        joined = [np.allclose(a[1], b[0]) for a, b in zip(vein["segments_mm"][:-1], vein["segments_mm"][1:])]
        assert sum(joined) >= len(vein["bends_mm"]) - 4   # one chain, plus at most one branch of <= 4 pieces
    assert meta["counts"]["flow_void"] >= 1
    assert all(o["site"] == "elsewhere" for o in meta["objects"] if o["type"] == "calcification")


def test_a_randomised_case_keeps_the_label_contract(loud):
    image, label = sitk.GetArrayFromImage(loud.image), sitk.GetArrayFromImage(loud.label)
    assert loud.image.GetSize() == SMALL["size"] and loud.image.GetSpacing() == SMALL["spacing"]
    assert label.any() and not np.any(label & (image == 0))
    for obj in (o for o in loud.meta["objects"] if o["type"] == "cmb" and o.get("visible")):
        z, y, x = loud.label.TransformPhysicalPointToIndex(obj["centre_mm"])[::-1]
        assert label[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any(), obj


def test_atrophy_turns_tissue_next_to_csf_into_csf():
    tissue = anatomy.SubjectAnatomy(*(np.zeros((20, 20, 20), np.float32) for _ in range(6)))
    tissue.brain[:] = 1
    tissue.csf[:, :, :6] = 1            # a CSF space on one side, tissue on the other
    tissue.gm[:, :, 6:], tissue.wm[:, :, 6:] = 0.5, 0.5
    grown = simulate._atrophy(tissue, 2.0, (1.0, 1.0, 1.0))
    assert grown.csf[:, :, 7].mean() > 0.5 and grown.csf[:, :, 15].mean() == 0
    np.testing.assert_allclose((grown.gm + grown.wm + grown.csf)[:, :, 10:], 1, atol=1e-6)


def test_gibbs_rings_at_edges_and_motion_makes_ghosts_along_one_axis():
    block = np.zeros((2, 64, 64), np.float32)
    block[:, 24:40, 24:40] = 1.0
    ringing, _ = simulate._kspace_artefacts(np.random.default_rng(0), block, 0.5, 0.0)
    assert ringing.max() > 1.05 and ringing[:, 30:34, 30:34].mean() == pytest.approx(1, abs=0.1)
    ghosted, axis = simulate._kspace_artefacts(np.random.default_rng(1), block, 0.0, 0.3)
    outside = np.ones(block.shape, bool)
    outside[:, 20:44, 20:44] = False
    other_axis = 3 - axis
    ghost_band = np.moveaxis(ghosted * outside, other_axis, 1)[:, 24:40].max()  # ghosts stay in the object's band
    assert ghost_band > 0.05
    assert np.moveaxis(ghosted, other_axis, 1)[:, :20].max() < 0.02


def test_skull_stripping_edges_keep_a_rim_outside_and_cut_some_cortex():
    zz, yy, xx = np.indices((8, 80, 80))
    brain = (yy - 40) ** 2 + (xx - 40) ** 2 < 30**2
    signal = np.where(brain, 1.0, 0.0).astype(np.float32)
    new_brain, new_signal, counts = simulate._mask_edges(np.random.default_rng(2), brain, signal,
                                                         np.ones_like(signal), 1.0, (1.0, 1.0, 3.0))
    added, cut = new_brain & ~brain, brain & ~new_brain
    assert counts == {"kept_outside": int(added.sum()), "cut_inside": int(cut.sum())} and added.any() and cut.any()
    distance_out = ndimage.distance_transform_edt(~brain[0])
    assert distance_out[added[0]].max() <= 3.5           # no more than 3 mm of rim
    assert np.all(new_signal[added] > 0)


def test_vessel_ends_become_hard_negative_crops_except_next_to_a_microbleed(tmp_path):
    shape = (24, 40, 40)
    array = np.random.default_rng(0).normal(100, 4, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[12, 20, 20] = 1
    spacing = (0.49, 0.49, 0.8)
    sitk.WriteImage(make_image(array, spacing), str(tmp_path / "sub-001_space-T2S_desc-masked_T2S.nii.gz"))
    sitk.WriteImage(make_image(label, spacing), str(tmp_path / "sub-001_space-T2S_CMB.nii.gz"))
    world = lambda z, y, x: [x * 0.49, y * 0.49, z * 0.8]  # noqa: E731
    vein = {"type": "vein", "centre_mm": world(6, 8, 8), "core_diameter_mm": 0.6,
            "ends_mm": [world(6, 8, 4), world(10, 20, 21)], "bends_mm": [world(6, 8, 30)]}
    (tmp_path / "sub-001_space-T2S_sim.json").write_text(json.dumps({"objects": [vein]}))
    crops = case_pool("sub-001", tmp_path / "sub-001_space-T2S_desc-masked_T2S.nii.gz",
                      tmp_path / "sub-001_space-T2S_CMB.nii.gz", np.random.default_rng(0), negatives=2)
    mimics = sorted(c.meta["type"] for c in crops if c.kind == "mimic")
    assert mimics == ["vein", "vein_bend", "vein_end"]   # the end beside the microbleed is left out


def test_false_positives_are_put_down_to_the_object_they_sit_on():
    vein = {"type": "vein", "centre_mm": [5, 0, 0], "core_diameter_mm": 1.0, "ends_mm": [[0, 0, 0], [10, 0, 0]]}
    bent = {"type": "vein", "centre_mm": [0, 50, 0], "core_diameter_mm": 1.0,
            "segments_mm": [[[0, 50, 0], [0, 60, 0]], [[0, 60, 0], [10, 60, 0]]]}
    calcification = {"type": "calcification", "centre_mm": [30, 0, 0], "core_diameter_mm": 2.0}
    faint = {"type": "cmb", "centre_mm": [60, 0, 0], "core_diameter_mm": 1.0, "visible": False}
    objects = [vein, bent, calcification, faint]
    assert object_distance(vein, (5, 2, 0)) == pytest.approx(1.5)
    assert object_distance(vein, (13, 0, 0)) == pytest.approx(2.5)   # past the end
    assert object_distance(bent, (8, 62, 0)) == pytest.approx(1.5)   # beside the second piece
    assert [cause_of(p, objects) for p in [(5, 2, 0), (8, 62, 0), (30, 3.5, 0), (61, 0, 0), (5, 5, 0)]] == \
        ["vein", "vein", "calcification", "unrated_cmb", "other"]
    record = {"evidence": {"components": [{"claim": None}, {"claim": 0}, {"claim": None}]},
              "lesions": [{"world_x_mm": 5, "world_y_mm": 2, "world_z_mm": 0},
                          {"world_x_mm": 60, "world_y_mm": 0, "world_z_mm": 0},
                          {"world_x_mm": 5, "world_y_mm": 5, "world_z_mm": 0}]}
    assert false_positive_causes(record, [True, True, True], objects) == {"vein": 1, "other": 1}
    assert false_positive_causes(record, [False, True, True], objects) == {"other": 1}


def test_cli_profiles_are_recorded_and_unknown_names_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(synth_cli, "choose_grid", lambda grid, seed: SMALL)
    assert synth_cli.main(["--out", str(tmp_path), "--cases", "1", "--profile", "ood", "--set", "veins=[2,2]"]) == 0
    meta = json.loads((tmp_path / "sub-001_space-T2S_sim.json").read_text())
    assert meta["profile"] == "ood" and meta["overrides"]["anatomy_sources"] == ["pydeface"]
    assert meta["overrides"]["veins"] == [2, 2] and meta["anatomy"]["source"] == "pydeface"
    assert {o.get("model") for o in meta["objects"] if o["type"] == "vein"} == {"short"}
    for item in ('anatomy_sources=["nosuch"]', 'vein_models=["curly"]', 'contrast="loud"', "anatomy_sources=[]"):
        with pytest.raises(SystemExit, match="--set"):
            synth_cli.parse_overrides([item])


def test_benchmark_sets_share_the_workers_and_skip_what_is_made(tmp_path):
    from valdocmb.bench.jobs import scoring_sets, synthesis

    sets = {"a": ["--seed", "1", "--cases", "30"], "b": ["--cases", "10"], "done": ["--cases", "20"]}
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "sub-001_space-T2S_CMB.nii.gz").write_bytes(b"")
    commands = synthesis(sets, tmp_path, 12, "--grid", "alfa3")
    assert sorted(commands) == ["synth-a", "synth-b"]
    a = commands["synth-a"]
    assert a[a.index("--workers") + 1] == "6" and a[a.index("--grid") + 1] == "alfa3" and a[-2:] == ["--cases", "30"]
    assert commands["synth-b"][commands["synth-b"].index("--workers") + 1] == "2"
    for subject in ("sub-001", "sub-002", "sub-003"):
        for kind in ("desc-masked_T2S.nii.gz", "CMB.nii.gz"):
            (tmp_path / "done" / f"{subject}_space-T2S_{kind}").write_bytes(b"")
    scoring = scoring_sets(Path("w"), ["done"], tmp_path, tmp_path / "scores", "new", "cpu", 2)
    assert sorted(scoring) == ["new-done-0", "new-done-1"]
    first = scoring["new-done-0"]
    assert first[first.index("--cache") + 1] == str(tmp_path / "scores" / "new-done")
    assert first[first.index("--subjects") + 1:] == ["sub-001", "sub-003"]
