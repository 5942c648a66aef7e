"""Bootstrap intervals, per-class metrics and reliability tables on hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest

from components.intervals import bootstrap_intervals, calibration_error, per_class_table, reliability_table


def test_interval_contains_the_value_and_narrows_with_more_data():
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        correct = rng.random(n) < 0.8
        interval = bootstrap_intervals(lambda rows: {"accuracy": correct[rows].mean()}, n, resamples=400)["accuracy"]
        assert interval["low"] <= interval["value"] <= interval["high"]
        return interval["high"] - interval["low"]

    assert width(2000) < width(100) / 2


def test_per_class_metrics_match_hand_counts():
    labels = np.array(["glioma", "glioma", "notumor", "notumor", "pituitary", "pituitary"])
    predicted = np.array(["glioma", "notumor", "notumor", "notumor", "pituitary", "glioma"])
    probabilities = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    table = per_class_table(labels, predicted, probabilities, ["glioma", "notumor", "pituitary"]).set_index("class")
    assert table.loc["glioma", "recall"] == 0.5 and table.loc["glioma", "precision"] == 0.5
    assert table.loc["notumor", "precision"] == pytest.approx(2 / 3) and table.loc["notumor", "recall"] == 1.0
    assert table["support"].tolist() == [2, 2, 2]


def test_reliability_of_a_calibrated_and_an_overconfident_score():
    rng = np.random.default_rng(1)
    score = rng.random(20000)
    calibrated = rng.random(20000) < score
    assert calibration_error(reliability_table(calibrated, score)) < 0.02
    overconfident = rng.random(20000) < 0.5 + (score - 0.5) * 0.5
    assert calibration_error(reliability_table(overconfident, score)) > 0.1
