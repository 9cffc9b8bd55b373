"""Training end to end on tiny cases: weights, manifest, resumption, and the pipeline loading the result."""

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from valdocmb.core.lesion_rule import rule_from_manifest
from valdocmb.core.three_stage import WEIGHT_FILES, ThreeStagePipeline
from valdocmb.core.weights import sha256
from valdocmb.train import crossval, schedules
from valdocmb.train import three_stage as training
from valdocmb.train.__main__ import main as train_main
from valdocmb.train.samples import CROP, Crop, augment, case_pool, draw_batch, find_training_cases

from conftest import make_image

pytestmark = pytest.mark.slow  # minutes of training, simulation or a soak: `pytest -m "not slow"` skips them


def tiny_case(folder, subject, seed, blobs):
    rng = np.random.default_rng(seed)
    shape = (24, 40, 40)
    array = rng.normal(100, 4, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    zz, yy, xx = np.indices(shape)
    for z, y, x in blobs:
        r2 = (zz - z) ** 2 * 1.6**2 + ((yy - y) ** 2 + (xx - x) ** 2) * 0.49**2
        array[r2 <= 1.5**2] = 20
        label[r2 <= 1.5**2] = 1
    sitk.WriteImage(make_image(array, (0.49, 0.49, 0.8)), str(folder / f"{subject}_space-T2S_desc-masked_T2S.nii.gz"))
    sitk.WriteImage(make_image(label, (0.49, 0.49, 0.8)), str(folder / f"{subject}_space-T2S_CMB.nii.gz"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    tiny_case(folder, "sub-001", 1, [(12, 20, 20)])
    tiny_case(folder, "sub-002", 2, [(8, 10, 12), (16, 30, 28)])
    tiny_case(folder, "sub-003", 3, [])
    return folder


def test_pool_has_one_positive_per_lesion_and_random_negatives(data):
    cases = find_training_cases(data)
    assert [c[0] for c in cases] == ["sub-001", "sub-002", "sub-003"]
    crops = case_pool(*cases[1], np.random.default_rng(0), negatives=5)
    kinds = [c.kind for c in crops]
    assert kinds.count("positive") == 2 and kinds.count("negative") == 5
    positive = crops[0]
    centre = tuple(np.array(CROP) // 2)
    assert positive.label[centre] == 1 and positive.volume.shape == CROP
    assert all(c.label[centre] == 0 for c in crops if c.kind == "negative")


def test_augmentation_keeps_the_lesion_near_the_centre():
    crop_volume = np.zeros(CROP, np.float16)
    label = np.zeros(CROP, np.uint8)
    c = np.array(CROP) // 2
    label[c[0] - 1:c[0] + 2, c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 3] = 1
    crop = Crop(crop_volume, label, "positive", "x")
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, patch_label = augment(crop, (16, 20, 20), rng)
        assert patch_label.shape == (16, 20, 20)
        assert patch_label[4:12, 6:14, 6:14].any()      # shifted by < 4 voxels, never out of the patch centre


def test_batches_follow_the_proportions():
    crops = {k: [Crop(np.zeros(CROP, np.float16), np.zeros(CROP, np.uint8), k, "x")]
             for k in ("positive", "negative", "mined")}
    _, classes, _ = draw_batch(crops, {"positive": 1, "negative": 2, "mined": 1}, 4000, (16, 20, 20),
                               np.random.default_rng(0), augmentation=False)
    assert abs(classes.mean() - 0.25) < 0.03


def test_training_writes_inference_weights_and_manifest_and_resumes(data, tmp_path, monkeypatch):
    monkeypatch.setitem(schedules.SCHEDULES, "smoke", schedules.Schedule(1, 32, 1, 32, 1, 32, 1, 8, 8))
    out, work = tmp_path / "weights", tmp_path / "work"
    args = ["--data", str(data), "--out", str(out), "--work", str(work), "--schedule", "smoke", "--workers", "1"]
    assert train_main(args) == 0
    manifest = json.loads((out / "MANIFEST.json").read_text())
    for relative in WEIGHT_FILES.values():
        entry = manifest["files"][relative]
        assert entry["sha256"] == sha256(out / relative)
        assert entry["training"]["cases"] == 3 and entry["training"]["schedule"] == "smoke"
        assert set(torch.load(out / relative, weights_only=True)) == {"architecture", "state_dict", "meta"}
    pipeline = ThreeStagePipeline.from_weights(out, "cpu")
    assert pipeline.config.target_spacing == (0.49, 0.49, 0.8)
    assert rule_from_manifest(out).is_noop()

    # a second run finds every stage's checkpoint complete and the pool cached: nothing is trained again
    before = (work / "screening.ckpt").stat().st_mtime_ns
    assert train_main(args) == 0
    assert (work / "screening.ckpt").stat().st_mtime_ns == before

    # new weights over old ones: the rule and figures measured on the old ones go, other methods' entries stay
    manifest = json.loads((out / "MANIFEST.json").read_text())
    manifest["lesion_rule"] = {"min_probability": 0.9, "min_volume_mm3": 1.0, "min_discrimination": 0.5,
                               "min_mean_probability": 0.6}
    manifest["validation"], manifest["comparison"] = {"cases": 50}, {"cases": 20}
    manifest["files"]["nnunet/plans.json"] = {"sha256": "0" * 64, "method": "nnunet"}
    (out / "MANIFEST.json").write_text(json.dumps(manifest))
    assert not rule_from_manifest(out).is_noop()
    assert train_main(args) == 0  # the same weights again: nothing is dropped
    assert not rule_from_manifest(out).is_noop()
    other_seed = ["--data", str(data), "--out", str(out), "--work", str(tmp_path / "work2"), "--schedule", "smoke",
                  "--workers", "1", "--seed", "1"]
    assert train_main(other_seed) == 0
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert not {"lesion_rule", "validation", "comparison"} & set(manifest)
    assert manifest["files"]["nnunet/plans.json"]["method"] == "nnunet"
    assert rule_from_manifest(out).is_noop()


def test_weights_record_the_spacing_their_crops_were_made_at(data, tmp_path, monkeypatch):
    # was: every weight file said [0.49, 0.49, 0.8], whatever grid the sample pool was cut from
    monkeypatch.setitem(schedules.SCHEDULES, "smoke", schedules.Schedule(1, 8, 1, 8, 1, 8, 1, 4, 4, 4))
    out = tmp_path / "weights"
    assert train_main(["--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"), "--schedule",
                       "smoke", "--workers", "1", "--max-cases", "1", "--spacing", "0.7", "0.7", "1.2"]) == 0
    assert (tmp_path / "work" / "pool_seed0_0.7x0.7x1.2mm" / "sub-001.pkl").is_file()  # crops cut on that grid
    for relative in WEIGHT_FILES.values():
        assert torch.load(out / relative, weights_only=True)["meta"]["target_spacing"] == [0.7, 0.7, 1.2]
    assert ThreeStagePipeline.from_weights(out, "cpu").config.target_spacing == (0.7, 0.7, 1.2)


def test_schedule_overrides_change_only_the_named_numbers():
    base = schedules.SCHEDULES["cpu"]
    changed = schedules.schedule_with(base, ["discrimination_iterations=30", "mining_threshold=0.2"])
    assert changed.discrimination_iterations == 30 and changed.mining_threshold == 0.2
    assert changed.screening_iterations == base.screening_iterations
    assert schedules.SCHEDULES["cpu"].discrimination_iterations == 10  # the named schedule itself is untouched
    for bad in ("discrimination_iterations", "no_such=3", "batch_size=many", "batch_size=0"):
        with pytest.raises(SystemExit, match="--set"):
            schedules.schedule_with(base, [bad])


def test_cross_validation_tests_every_case_once_on_networks_not_trained_on_it(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(schedules.SCHEDULES, "smoke", schedules.Schedule(1, 8, 1, 8, 1, 8, 1, 4, 4, 4))
    trained_on, tested = [], []
    real_train_all, real_evaluate = crossval.train_all, crossval.evaluate_stages

    def recording_train_all(crops, *args, **kwargs):
        trained_on.append({c.case for c in crops})
        return real_train_all(crops, *args, **kwargs)

    def recording_evaluate(pipeline, cases, *args, **kwargs):
        tested.append({c[0] for c in cases})
        return real_evaluate(pipeline, cases, *args, **kwargs)

    monkeypatch.setattr(crossval, "train_all", recording_train_all)
    monkeypatch.setattr(crossval, "evaluate_stages", recording_evaluate)
    # untrained networks confirm every candidate: keep a few so that the test stays fast
    def few(*nets_and_device, config):
        return ThreeStagePipeline(*nets_and_device, config=replace(config, max_candidates=4))

    monkeypatch.setattr(crossval, "ThreeStagePipeline", few)
    work = tmp_path / "work"
    assert train_main(["--data", str(data), "--work", str(work), "--schedule", "smoke", "--workers", "1",
                       "--folds", "3"]) == 0
    assert len(tested) == 3 and sorted(s for fold in tested for s in fold) == ["sub-001", "sub-002", "sub-003"]
    for fold_train, fold_test in zip(trained_on, tested):
        assert fold_train and not fold_train & fold_test
    table = json.loads((work / "crossval.json").read_text())
    assert [row["cases"] for row in table["folds"]] == [1, 1, 1]
    out = capsys.readouterr().out
    assert "Dice" in out and "CntDiff" in out and "mean" in out


# -- fine-tuning from given weights (--init) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parent_weights(data, tmp_path_factory):
    """Weights trained on the tiny cases (the 'shipped' weights a user starts from), with an nnU-Net entry."""
    out = tmp_path_factory.mktemp("parent")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(schedules.SCHEDULES, "smoke", schedules.Schedule(1, 16, 1, 16, 1, 16, 1, 8, 8))
        assert train_main(["--data", str(data), "--out", str(out), "--work", str(out.parent / "parent-work"),
                           "--schedule", "smoke", "--workers", "1"]) == 0
    (out / "nnunet").mkdir()
    (out / "nnunet" / "plans.json").write_text("{}")
    content = json.loads((out / "MANIFEST.json").read_text())
    content["files"]["nnunet/plans.json"] = {"sha256": sha256(out / "nnunet" / "plans.json"), "method": "nnunet"}
    (out / "MANIFEST.json").write_text(json.dumps(content))
    return out


def finetune_schedule(monkeypatch):
    monkeypatch.setitem(schedules.SCHEDULES, "finetune",
                        schedules.Schedule(1, 8, 1, 16, 1, 16, 1, 8, 8, learning_rate_scale=0.1))
    # barely trained networks find candidates everywhere: a few per scan keep mining and scoring fast
    find_candidates = ThreeStagePipeline.find_candidates
    monkeypatch.setattr(ThreeStagePipeline, "find_candidates", lambda self, scores: find_candidates(self, scores)[:3])


def test_finetuning_starts_from_the_given_weights_and_leaves_them_as_they_were(data, parent_weights, tmp_path,
                                                                               monkeypatch):
    finetune_schedule(monkeypatch)
    before = {relative: sha256(parent_weights / relative) for relative in WEIGHT_FILES.values()}
    parent_version = ThreeStagePipeline.from_weights(parent_weights, "cpu").weights_info["version"]
    out, work = tmp_path / "mine", tmp_path / "work"
    assert train_main(["--data", str(data), "--init", str(parent_weights), "--out", str(out), "--work", str(work),
                       "--workers", "1", "--freeze-early"]) == 0
    assert {relative: sha256(parent_weights / relative) for relative in WEIGHT_FILES.values()} == before
    content = json.loads((out / "MANIFEST.json").read_text())
    for relative in WEIGHT_FILES.values():
        training_meta = content["files"][relative]["training"]
        assert training_meta["parent"]["version"] == parent_version and training_meta["parent"]["freeze_early"]
        assert training_meta["schedule"] == "finetune"
    # a complete weights folder: the parent's nnU-Net files come along, and no rule chosen for other networks
    assert (out / "nnunet" / "plans.json").is_file() and content["files"]["nnunet/plans.json"]["method"] == "nnunet"
    assert "lesion_rule" not in content
    # the false positives of the given weights were mined into a pool cache of their own
    assert (work / f"pool_seed0_0.49x0.49x0.8mm_mined-{parent_version}").is_dir()
    # frozen early layers are the parent's, bit for bit; the rest moved
    parent = ThreeStagePipeline.from_weights(parent_weights, "cpu")
    tuned = ThreeStagePipeline.from_weights(out, "cpu")
    for name in ("screening", "discrimination", "segmentation"):
        old, new = getattr(parent, name), getattr(tuned, name)
        for old_layer, new_layer in zip(training.early_layers(old), training.early_layers(new)):
            for (key, a), (_, b) in zip(old_layer.state_dict().items(), new_layer.state_dict().items()):
                assert torch.equal(a, b), (name, key)
        assert any(not torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_finetuning_keeps_the_thresholds_chosen_for_the_given_weights(data, parent_weights, tmp_path, monkeypatch):
    """Streamed weights carry their own thresholds (screening about 0.05, not the default 0.1): fine-tuned networks,
    which start from them at a tenth of the learning rate, keep them, in their files and in the folds' scoring."""
    import shutil

    from valdocmb.core.weights import save_weights

    finetune_schedule(monkeypatch)
    parent = tmp_path / "streamed"
    shutil.copytree(parent_weights, parent)
    nets = ThreeStagePipeline.from_weights(parent, "cpu")
    content = json.loads((parent / "MANIFEST.json").read_text())
    for name, threshold in (("screening", 0.048), ("discrimination", 0.31)):
        relative = WEIGHT_FILES[name]
        meta = {"target_spacing": [0.49, 0.49, 0.8], f"{name}_threshold": threshold}
        content["files"][relative]["sha256"] = save_weights(getattr(nets, name), parent / relative, meta)
    (parent / "MANIFEST.json").write_text(json.dumps(content))
    streamed = ThreeStagePipeline.from_weights(parent, "cpu")
    assert training.carried_thresholds(streamed) == {"screening_threshold": 0.048, "discrimination_threshold": 0.31}
    config = crossval.fine_tuned_config(streamed, (0.49, 0.49, 0.8))
    assert (config.screening_threshold, config.discrimination_threshold) == (0.048, 0.31)
    out = tmp_path / "mine"
    assert train_main(["--data", str(data), "--init", str(parent), "--out", str(out), "--work", str(tmp_path / "work"),
                       "--workers", "1"]) == 0
    tuned = ThreeStagePipeline.from_weights(out, "cpu")
    assert (tuned.config.screening_threshold, tuned.config.discrimination_threshold) == (0.048, 0.31)
    assert json.loads((out / "MANIFEST.json").read_text())["three_stage_training"]["screening_threshold"][
        "chosen_on"] == f"carried from {parent}"


@pytest.mark.parametrize("extra,message", [
    (["--freeze-early"], "--freeze-early and --mix apply to fine-tuning"),
    (["--init", "PARENT", "--out", "PARENT"], "is the --init folder"),
    (["--init", "PARENT", "--mix-ratio", "1.5"], "--mix-ratio 1.5"),
    (["--init", "nowhere"], "not a weights folder"),
])
def test_finetuning_options_that_cannot_work_are_refused(data, parent_weights, tmp_path, capsys, extra, message):
    extra = [str(parent_weights) if item == "PARENT" else item for item in extra]
    args = ["--data", str(data), "--work", str(tmp_path / "work"), "--workers", "1"]
    if "--out" not in extra:
        args += ["--out", str(tmp_path / "out")]
    assert train_main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mined_sites_skip_labelled_lesions_and_rank_by_the_discrimination_network(monkeypatch):
    from valdocmb.core.three_stage import Candidate
    from valdocmb.train import samples
    from valdocmb.train.samples import mined_sites

    class Miner:
        def screen(self, volume, foreground):
            return np.zeros((2, 2, 2))

        def find_candidates(self, scores):
            return [Candidate((1, 1, 1), 0.9), Candidate((5, 5, 5), 0.8), Candidate((3, 3, 3), 0.5),
                    Candidate((7, 7, 7), 0.4)]

        def discriminate(self, volume, centres):
            belief = {(5, 5, 5): 0.2, (3, 3, 3): 0.95, (7, 7, 7): 0.6}
            return np.array([belief[tuple(c)] for c in centres])

    lesion_zone = np.zeros((10, 10, 10), bool)
    lesion_zone[1, 1, 1] = True                     # the first candidate is a labelled CMB: not a false positive
    sites = mined_sites(Miner(), np.zeros((10, 10, 10)), None, lesion_zone, count=2)
    assert [tuple(site[0]) for site in sites] == [(3, 3, 3), (7, 7, 7)]
    assert sites[0][1] == "mined" and sites[0][2]["discrimination_score"] == 0.95
    # only the best screening candidates are ranked: with room for two, the fourth is never looked at
    monkeypatch.setattr(samples, "MINING_CANDIDATES", 2)
    assert [tuple(site[0]) for site in mined_sites(Miner(), np.zeros((10, 10, 10)), None, lesion_zone, count=5)] == [
        (3, 3, 3), (5, 5, 5)]


def test_mixed_in_crops_make_the_asked_share_and_are_never_tested(data, tmp_path):
    from argparse import Namespace

    from valdocmb.train.__main__ import mixed_in

    crops = [Crop(np.zeros(CROP, np.float16), np.zeros(CROP, np.uint8), "negative", "sub-001")] * 30
    args = Namespace(mix=data, mix_ratio=0.25, seed=0, workers=1, work=tmp_path)
    mixed = mixed_in(args, crops, (0.49, 0.49, 0.8))
    assert len(mixed) == 10 and all(c.case.startswith("mix:sub-") for c in mixed)
    assert crossval.fold_of(["sub-001", "sub-002"], 2, 0).get(mixed[0].case) is None


def test_finetuning_cross_validation_compares_on_the_same_folds_and_records_a_crossfitted_rule(
        data, parent_weights, tmp_path, monkeypatch, capsys):
    finetune_schedule(monkeypatch)
    out, work = tmp_path / "mine", tmp_path / "work"
    assert train_main(["--data", str(data), "--init", str(parent_weights), "--out", str(out), "--work", str(work),
                       "--workers", "1", "--folds", "3"]) == 0
    result = json.loads((work / "finetune_crossval.json").read_text())
    assert [row["cases"] for row in result["table"]] == [1, 1, 1]
    assert {"unchanged", "fine_tuned"} <= set(result["table"][0]) and result["subjects"] == ["sub-001", "sub-002",
                                                                                            "sub-003"]
    printed = capsys.readouterr().out
    assert "unchanged: sens" in printed and "fine-tuned: sens" in printed
    # the final weights, trained on every case, carry the rule chosen on the out-of-fold results
    content = json.loads((out / "MANIFEST.json").read_text())
    rule = content["lesion_rule"]
    assert rule["chosen_on"].endswith("out-of-fold results of 3-fold fine-tuning")
    assert rule["weights"] == ThreeStagePipeline.from_weights(out, "cpu").weights_info["version"]
    assert "cross_fitted" in rule and "unchanged_weights" in rule
    assert (work / "final" / "segmentation.ckpt").is_file()


def test_finetuning_folds_trained_in_parallel_processes_give_the_same_table(data, parent_weights, tmp_path,
                                                                              monkeypatch, capsys):
    finetune_schedule(monkeypatch)
    tables = []
    for parallel in ("1", "3"):
        work = tmp_path / f"work{parallel}"
        assert train_main(["--data", str(data), "--init", str(parent_weights), "--out", str(tmp_path / parallel),
                           "--work", str(work), "--workers", "1", "--folds", "3", "--parallel", parallel]) == 0
        tables.append(json.loads((work / "finetune_crossval.json").read_text())["table"])
    # the processes left every fold's scores and the final weights' checkpoints for the run to resume from
    assert all((tmp_path / "work3" / f"fold{k}" / "evaluation").is_dir() for k in range(3))
    assert (tmp_path / "work3" / "final" / "segmentation.ckpt").is_file()
    assert tables[0] == tables[1]


def test_subject_seeds_come_from_the_whole_name():
    from valdocmb.train.three_stage import _case_seed

    assert _case_seed(0, "sub-ABC") != _case_seed(0, "sub-XYZ")  # was: digits only, so both drew seed 0's stream
    assert _case_seed(0, "sub-001") != _case_seed(0, "sub-1001") != _case_seed(1, "sub-001")
    assert _case_seed(3, "sub-ABC") == _case_seed(3, "sub-ABC")
