"""weights/MANIFEST.json through its one owner: merging updates, JSON without NaN, damaged files, stale entries."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from valdocmb.core import manifest
from valdocmb.core.errors import CaseError


def test_updates_merge_and_store_undefined_figures_as_null(tmp_path):
    manifest.update(tmp_path, lambda m: m["files"].update({"a.pt": {"sha256": "1" * 64}}))
    manifest.update(tmp_path, lambda m: m.update(validation={"f1": math.nan, "cases": 3}))
    stored = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert stored == {"files": {"a.pt": {"sha256": "1" * 64}}, "validation": {"f1": None, "cases": 3}}
    assert manifest.entry(tmp_path, "a.pt") == {"sha256": "1" * 64}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temporary file left behind


def test_concurrent_updates_lose_nothing(tmp_path):
    def add(i):
        manifest.update(tmp_path, lambda m: m.update({f"key{i}": i}))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(40)))
    stored = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert {f"key{i}" for i in range(40)} <= set(stored)


def test_a_damaged_manifest_is_a_case_error_naming_the_file(tmp_path):
    (tmp_path / "MANIFEST.json").write_text('{"files": ')
    with pytest.raises(CaseError, match="MANIFEST.json: not a readable JSON manifest"):
        manifest.read(tmp_path)
    (tmp_path / "MANIFEST.json").write_text('["not", "a", "manifest"]')
    with pytest.raises(CaseError, match="not a valdocmb manifest"):
        manifest.read(tmp_path)


def test_new_three_stage_weights_make_the_figures_measured_on_the_old_ones_stale():
    files = {"three_stage/screening.pt": {"sha256": "a"}, "nnunet/plans.json": {"sha256": "n"}}
    content = {"files": {**files}, "lesion_rule": {}, "validation": {}, "comparison": {}, "other": 1}
    assert manifest.drop_stale(content, files, ["three_stage/screening.pt"]) == []
    content["files"]["three_stage/screening.pt"] = {"sha256": "b"}
    assert manifest.drop_stale(content, files, ["three_stage/screening.pt"]) == ["lesion_rule", "validation",
                                                                                  "comparison"]
    assert set(content) == {"files", "other"}


def test_the_command_recorded_is_the_one_main_was_given():
    assert manifest.command_line("valdocmb-tune", ["--cache", "x"]) == "valdocmb-tune --cache x"


def test_weights_folder_default_order_and_a_wheel_without_weights(tmp_path, monkeypatch):
    """/opt/ml/model, then CMB_WEIGHTS, then the shipped weights/; an installation without weights/ says how to
    give them, not just that a folder is missing."""
    from valdocmb.core import weights

    monkeypatch.setattr(weights, "UPLOADED_MODEL_DIR", tmp_path / "absent")
    monkeypatch.delenv("CMB_WEIGHTS", raising=False)
    assert weights.default_weights_dir() == weights.SHIPPED_WEIGHTS_DIR
    monkeypatch.setenv("CMB_WEIGHTS", str(tmp_path))
    assert weights.resolve_weights_dir(None) == tmp_path
    monkeypatch.delenv("CMB_WEIGHTS")
    monkeypatch.setattr(weights, "SHIPPED_WEIGHTS_DIR", tmp_path / "site-packages-parent" / "weights")
    with pytest.raises(CaseError, match="give --weights DIR or set CMB_WEIGHTS"):
        weights.resolve_weights_dir(None)


def _weights_folder(folder, content: bytes, extra: dict, version_tag=True):
    """A three-stage weights folder with stand-in network files (shipping checks sha256s, never loads them)."""
    from valdocmb.core.three_stage import WEIGHT_FILES, version_of
    from valdocmb.core.weights import sha256
    files, digests = {}, {}
    for name, relative in WEIGHT_FILES.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content + name.encode())
        digests[name] = sha256(folder / relative)
        files[relative] = {"sha256": digests[name], "stage": name}
    version = version_of(digests)
    tagged = {key: {**value, "weights": version} if version_tag else value for key, value in extra.items()}
    manifest.update(folder, lambda m: (m["files"].update(files), m.update(tagged)))
    return version


def test_shipping_replaces_the_networks_and_every_entry_measured_on_them(tmp_path):
    from valdocmb.train.ship import main, ship
    source, shipped = tmp_path / "new", tmp_path / "weights"
    version = _weights_folder(source, b"new", {"lesion_rule": {"min_probability": 0.7},
                                               "int8_calibration": {"ranges": {"a": 1}}})
    _weights_folder(shipped, b"old", {"lesion_rule": {"min_probability": 0.5}, "validation": {"f1": 0.6},
                                      "int8_calibration": {"ranges": {"a": 2}}})
    manifest.update(shipped, lambda m: m["files"].update({"nnunet/plans.json": {"sha256": "keep"}}))

    assert main([str(source), "--into", str(shipped), "--dry-run"]) == 0
    assert (shipped / "three_stage/screening.pt").read_bytes() == b"oldscreening"   # a dry run changes nothing

    summary = ship(source, shipped)
    assert summary["version"] == version and summary["removed"] == ["validation"]
    after = manifest.read(shipped)
    assert (shipped / "three_stage/screening.pt").read_bytes() == b"newscreening"
    assert after["files"]["nnunet/plans.json"] == {"sha256": "keep"}          # other methods' entries stay
    assert after["files"]["three_stage/screening.pt"] == manifest.read(source)["files"]["three_stage/screening.pt"]
    assert after["lesion_rule"]["min_probability"] == 0.7 and after["int8_calibration"]["weights"] == version
    assert "validation" not in after                                         # measured on the old networks
    assert not list(shipped.rglob("*.partial"))


def test_shipping_refuses_a_changed_file_foreign_entries_and_no_lesion_rule(tmp_path):
    from valdocmb.train.ship import main, ship
    target = tmp_path / "weights"
    _weights_folder(target, b"old", {"lesion_rule": {}})
    untouched = manifest.read(target)

    no_rule = tmp_path / "no-rule"
    _weights_folder(no_rule, b"a", {})
    with pytest.raises(CaseError, match="no 'lesion_rule'"):
        ship(no_rule, target)

    foreign = tmp_path / "foreign"
    _weights_folder(foreign, b"b", {"lesion_rule": {}, "candidate_budget": {"weights": "0123456789ab"}},
                    version_tag=False)
    with pytest.raises(CaseError, match="'candidate_budget' was made for weights 0123456789ab"):
        ship(foreign, target)

    changed = tmp_path / "changed"
    _weights_folder(changed, b"c", {"lesion_rule": {}})
    (changed / "three_stage/segmentation.pt").write_bytes(b"retrained after the manifest")
    assert main([str(changed), "--into", str(target)]) == 1
    assert manifest.read(target) == untouched
    assert (target / "three_stage/segmentation.pt").read_bytes() == b"oldsegmentation"
