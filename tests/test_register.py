from components.config import RegisterConfig
from components.register import decide

GOOD = {"accuracy": 0.9, "sensitivity": 0.9, "specificity": 0.9, "roc_auc": 0.95}
CONFIG = RegisterConfig(min_accuracy=0.8, min_sensitivity=0.8, min_specificity=0.8, min_auc=0.85, tolerance=0.01)


def test_first_model_meeting_thresholds_is_promoted():
    assert decide(GOOD, CONFIG, None).promoted


def test_each_missed_threshold_is_a_reason():
    decision = decide({**GOOD, "sensitivity": 0.7, "roc_auc": float("nan")}, CONFIG, None)
    assert not decision.promoted
    assert any("sensitivity 0.7000" in r for r in decision.reasons)
    assert any("roc_auc" in r for r in decision.reasons)


def test_worse_than_champion_on_same_data_is_refused_within_tolerance_is_not():
    assert not decide(GOOD, CONFIG, {**GOOD, "roc_auc": 0.97}).promoted
    assert decide(GOOD, CONFIG, {**GOOD, "roc_auc": 0.955}).promoted


def test_worst_subgroup_sensitivity_is_a_threshold_and_a_comparison_where_measured():
    fair = {**GOOD, "worst_subgroup_sensitivity": 0.85}
    assert decide(fair, CONFIG, None).promoted
    assert not decide({**GOOD, "worst_subgroup_sensitivity": 0.6}, CONFIG, None).promoted
    assert not decide(fair, CONFIG, {**GOOD, "worst_subgroup_sensitivity": 0.95}).promoted
    assert decide(GOOD, CONFIG, {**GOOD, "worst_subgroup_sensitivity": 0.95}).promoted  # not measured here: not compared
