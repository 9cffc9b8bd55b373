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
