"""The weights comparison's decision rule, on hand-made figures (it was written down before any scoring)."""

import pytest

from valdocmb.bench import weights_eval
from valdocmb.bench.weights_eval import decide, named_folders


def figures(ood_f1, holdout_sensitivity):
    return {"shipped_ood": {"cross_fitted": {"all": {"f1": 0.60, "sensitivity": 0.5}}},
            "shipped_holdout": {"cross_fitted": {"all": {"f1": 0.85, "sensitivity": 0.90}}},
            "new_ood": {"cross_fitted": {"all": {"f1": ood_f1, "sensitivity": 0.8}}},
            "new_holdout": {"cross_fitted": {"all": {"f1": 0.8, "sensitivity": holdout_sensitivity}}}}


@pytest.mark.parametrize("ood_f1,sensitivity,wins", [
    (0.70, 0.90, True),    # better out of distribution, as sensitive in distribution
    (0.70, 0.88, True),    # 0.02 lower in distribution is allowed
    (0.70, 0.879, False),  # more than 0.02 lower is not
    (0.60, 0.95, False),   # equal OOD F1 is not better
])
def test_candidate_becomes_default_only_as_the_rule_says(ood_f1, sensitivity, wins):
    verdict = decide(figures(ood_f1, sensitivity), "new")
    assert verdict.startswith("new becomes the default" if wins else "new does not become the default")


def test_no_decision_without_figures_or_candidate():
    assert "no decision" in decide({}, "new") and "no decision" in decide(figures(0.7, 0.9), None)
    assert "undefined" in decide(figures(0.7, float("nan")), "new")  # a hold-out without microbleeds


def test_weight_sets_are_named():
    assert named_folders(["shipped=weights", "new=/tmp/w"])["new"].as_posix() == "/tmp/w"
    with pytest.raises(SystemExit):
        named_folders(["weights"])


def test_budget_table_lists_the_sets_with_microbleeds():
    rows = [{"budget": 500, "cases": 2, "microbleeds": 3, "held": 2, "candidates_per_scan": 420.0, "scans_capped": 1},
            {"budget": 1000, "cases": 2, "microbleeds": 3, "held": 3, "candidates_per_scan": 600.0, "scans_capped": 0}]
    empty = [{**row, "cases": 1, "microbleeds": 0, "held": 0} for row in rows]
    lines = weights_eval.budget_table({"new_ood": rows, "new_tuning": empty})
    assert lines[1] == "| weights, set | cases | microbleeds | K=500 | K=1000 |"
    assert lines[3:] == ["| new_ood | 2 | 3 | 2 (420) | 3 (600) |"]
    assert weights_eval.budget_table({"new_tuning": empty}) == [
        "Candidate budget: no scored case records screening ranks."]


def test_the_training_table_says_how_each_weight_set_was_trained(tmp_path):
    from valdocmb.core import manifest
    from valdocmb.train.streamed import learning_curve

    history = [{"step": i, "loss": 0.5, "seconds": 2.0, "items": 16, "items_per_s": 8.0, "regions_seen": i}
               for i in range(1, 101)] + [{"step": 100, "validation": {"loss": 0.4}}]
    curve = learning_curve(history, kept_step=100, unit="patches")
    assert (curve["steps"], curve["items_seen"], curve["unit"]) == (100, 1600, "patches")   # validation not counted

    streamed, pool = tmp_path / "streamed", tmp_path / "pool"
    meta = {"schedule": "hour", "hardware": "x86_64, 2 threads", "training_s": {"screening": 3600, "discrimination":
                                                                                   1800, "segmentation": 1800}}
    manifest.update(streamed, lambda m: m["files"].update(
        {f"three_stage/{stage}.pt": {"training": meta, "learning_curve": {**curve, "unit": unit}}
         for stage, unit in (("screening", "positions"), ("discrimination", "windows"), ("segmentation", "patches"))}))
    detail = {f"{stage}_{what}": n for stage in ("screening", "discrimination", "segmentation")
              for what, n in (("iterations", 2), ("samples", 3))}
    manifest.update(pool, lambda m: m["files"].update({"three_stage/screening.pt": {"training": {
        "schedule": "finetune", "parent": {"version": "abc"}, "wall_time_s": 360, "schedule_detail": detail}}}))
    lines = weights_eval.training_table({name: weights_eval.training_summary(folder) for name, folder in
                                         (("new", streamed), ("randomised", pool), ("missing", tmp_path / "none"))})
    assert lines[3] == "| new | hour | x86_64, 2 threads | 2.00 | 1,600 positions | 1,600 windows | 1,600 patches |"
    assert lines[4] == "| randomised | finetune (fine-tuned) | n/a | 0.10 | 6 samples | 6 samples | 6 samples |"
    assert lines[5] == "| missing | n/a | n/a | n/a | n/a | n/a | n/a |"


@pytest.mark.parametrize("int8_ood,verdict", [
    ((0.50, 0.95), "becomes"),          # the same microbleeds, 0.05 more FP per scan: within the rule
    ((0.50, 1.00), "does not become"),  # 0.1 more FP per scan
    ((0.49, 0.90), "does not become"),  # a microbleed fewer
])
def test_int8_becomes_the_default_only_as_its_rule_says(int8_ood, verdict):
    def cell(sensitivity, fp):
        return {"cross_fitted": {"all": {"sensitivity": sensitivity, "fp_per_scan": fp}}}

    result = {"new_ood": cell(0.50, 0.90), "new_holdout": cell(0.95, 0.30),
              "new-int8_ood": cell(*int8_ood), "new-int8_holdout": cell(0.95, 0.30)}
    assert weights_eval.decide_int8(result, "new-int8", "new").startswith(f"int8 {verdict} the default for new")
    assert "no decision" in weights_eval.decide_int8({"new_ood": cell(0.5, 0.9)}, "new-int8", "new")


def test_an_int8_arm_needs_a_plain_arm_on_the_same_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):   # no set scores the folder of new-int8 without int8
        weights_eval.main(["--out", str(tmp_path), "--weights", "shipped=elsewhere", "--weights", "new-int8=weights",
                           "--int8", "new-int8", "--report-only"])
    assert "--int8 new-int8" in capsys.readouterr().err
    assert weights_eval.main(["--out", str(tmp_path), "--weights", "shipped=weights", "--weights", "new-int8=weights",
                              "--int8", "new-int8", "--report-only"]) == 0


def test_the_full_run_lists_its_steps_skips_what_is_made_and_stops_at_a_failure(tmp_path, capsys, monkeypatch):
    from valdocmb.bench import full_run

    names = [step.name for step in full_run.steps(tmp_path, "full", 1)]
    assert names[:4] == ["train", "curves", "weights-before", "evaluate"] and names[-1] == "evaluate-ablation"
    assert names.index("hour-random-negatives-screening") < names.index("hour-random-negatives")
    ablation = full_run.steps(tmp_path, "full", 1)[-1].command
    assert "hour-standard-only=" + str(tmp_path / "weights-hour-standard-only") in ablation
    assert ablation[-3:] == ["--score-sets", "ood", "holdout"]
    smoke = full_run.steps(tmp_path, "smoke", 1, ablation_schedule="smoke", cases=(1, 2, 6))
    assert all("hour" not in step.command for step in smoke) and "smoke" in smoke[-2].command
    assert smoke[3].command[smoke[3].command.index("--ood-cases") + 1] == "2"
    assert f"shipped={tmp_path / 'weights-before'}" in smoke[3].command   # a copy: shipping mid-chain changes nothing
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "curves").touch()
    assert full_run.main(["--work", str(tmp_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("train: ") and "\ncurves:" not in printed and "\nint8-data: (done here)" in printed

    ran = []

    def fake(command, stdout, stderr):
        ran.append(command)
        return type("Done", (), {"returncode": 3 if "valdocmb.bench.weights_eval" in command else 0})()
    from valdocmb.bench import jobs
    monkeypatch.setattr(jobs.subprocess, "run", fake)
    shipped = tmp_path / "shipped"
    for relative in ("MANIFEST.json", "three_stage/screening.pt", "randomised/three_stage/screening.pt",
                     "nnunet/plans.json"):
        (shipped / relative).parent.mkdir(parents=True, exist_ok=True)
        (shipped / relative).write_text(relative)
    monkeypatch.setattr(full_run, "default_weights_dir", lambda: shipped)
    assert full_run.main(["--work", str(tmp_path)]) == 3           # training "ran", the evaluation failed
    assert len(ran) == 2 and "failed (exit 3)" in (tmp_path / "logs" / "full_run.log").read_text()
    frozen = tmp_path / "weights-before"
    assert (frozen / "randomised/three_stage/screening.pt").read_text() == "randomised/three_stage/screening.pt"
    assert not (frozen / "nnunet").exists() and (tmp_path / "done" / "weights-before").exists()


def budget_rows(held_at: dict[int, int], microbleeds: int = 10) -> list[dict]:
    return [{"budget": k, "cases": 5, "microbleeds": microbleeds, "held": held, "candidates_per_scan": float(k),
             "scans_capped": 1} for k, held in held_at.items()]


@pytest.mark.parametrize("holdout,ood,kept", [
    ({500: 9, 1000: 10, 2000: 10}, {500: 7, 1000: 8, 2000: 8}, 1000),   # the hold-outs lose nothing at 1000
    ({500: 9, 1000: 10, 2000: 10}, {500: 7, 1000: 7, 2000: 8}, None),   # one OOD microbleed ranked above 1000
])
def test_a_candidate_budget_is_chosen_on_tuning_and_kept_only_where_no_hold_out_loses(holdout, ood, kept):
    # tuning: 500 loses one of the nine the 2,000 cap holds, 1000 none (a microbleed no cap holds does not count)
    budgets = {"new_tuning": budget_rows({500: 8, 1000: 9, 2000: 9}), "new_holdout": budget_rows(holdout),
               "new_ood": budget_rows(ood)}
    budget = weights_eval.decide_budget(budgets, "new")
    assert budget["max_candidates"] == kept
    assert budget["verdict"].startswith("K = 1000 on the tuning set")
    if kept is None:
        assert "ood loses 1 of 8" in budget["verdict"]


def test_no_budget_when_the_tuning_set_needs_every_candidate_or_has_no_ranks():
    needs_all = {"new_tuning": budget_rows({500: 8, 1000: 8, 2000: 9})}
    assert weights_eval.decide_budget(needs_all, "new")["max_candidates"] is None
    assert "no decision" in weights_eval.decide_budget({}, "new")["verdict"]
    assert "no decision" in weights_eval.decide_budget({"new_tuning": budget_rows({500: 0, 2000: 0}, 0)},
                                                       "new")["verdict"]
