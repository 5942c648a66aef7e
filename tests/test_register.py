import numpy as np
import pandas as pd

from components.comparison import Difference, paired_differences
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


def test_worst_subgroup_sensitivity_is_a_threshold_where_measured():
    assert decide({**GOOD, "worst_subgroup_sensitivity": 0.85}, CONFIG, None).promoted
    assert not decide({**GOOD, "worst_subgroup_sensitivity": 0.6}, CONFIG, None).promoted


def test_a_difference_is_a_refusal_only_when_its_bound_is_below_the_tolerance():
    clearly_worse = Difference("roc_auc", 0.93, 0.97, upper_bound=-0.02)
    unlucky = Difference("roc_auc", 0.95, 0.97, upper_bound=0.01)
    refused = decide(GOOD, CONFIG, [clearly_worse])
    assert not refused.promoted and "roc_auc 0.9300 is worse than the champion's 0.9700" in refused.reasons[0]
    assert decide(GOOD, CONFIG, [unlucky]).promoted


def _test_set(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"label": rng.choice(["notumor", "tumor"], n), "site": rng.choice(["site-A", "site-B"], n)})


def _scored(test: pd.DataFrame, errors: np.ndarray) -> pd.DataFrame:
    truth = test["label"].to_numpy()
    predicted = np.where(errors, np.where(truth == "tumor", "notumor", "tumor"), truth)
    return pd.DataFrame({"predicted": predicted, "tumour_probability": (predicted == "tumor") * 0.8 + 0.1})


def test_paired_resampling_tells_a_real_loss_from_a_few_flipped_images():
    test = _test_set()
    rng = np.random.default_rng(1)
    champion_errors = rng.random(len(test)) < 0.05
    champion = _scored(test, champion_errors)
    flipped = champion_errors.copy()
    flipped[np.flatnonzero(~champion_errors)[:3]] = True  # three more mistakes of 400: noise
    worse = champion_errors | (rng.random(len(test)) < 0.10)  # about 10 % more mistakes: a real loss
    noise = {d.metric: d for d in paired_differences(test, _scored(test, flipped), champion, min_group_size=20)}
    loss = {d.metric: d for d in paired_differences(test, _scored(test, worse), champion, min_group_size=20)}
    assert noise["accuracy"].challenger < noise["accuracy"].champion and not noise["accuracy"].worse(0.005)
    assert loss["accuracy"].worse(0.005) and loss["worst_subgroup_sensitivity"].worse(0.005)


def test_a_loss_confined_to_one_site_is_caught_by_the_worst_subgroup_comparison():
    test = _test_set(seed=2)
    champion = _scored(test, np.zeros(len(test), bool))
    missed_at_b = (test["site"] == "site-B").to_numpy() & (test["label"] == "tumor").to_numpy() & (np.arange(len(test)) % 3 == 0)
    differences = {d.metric: d for d in paired_differences(test, _scored(test, missed_at_b), champion, min_group_size=20)}
    assert differences["worst_subgroup_sensitivity"].worse(0.005)
    assert differences["worst_subgroup_sensitivity"].champion == 1.0
