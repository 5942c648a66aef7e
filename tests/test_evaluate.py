import numpy as np
import pandas as pd
import pytest

from components.evaluate import binary_metrics, metrics_for
from components.model import ModelSpec


def test_binary_metrics_match_hand_counts():
    truth = np.array([True, True, True, False, False, False, False])
    score = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4])
    metrics = binary_metrics(truth, score)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(3 / 4)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["roc_auc"] == pytest.approx(10 / 12)  # 10 of 12 (tumour, no-tumour) pairs ranked right


def test_multiclass_accuracy_and_tumour_vs_none():
    spec = ModelSpec(network="resnet", image_size=32, channels=[8], blocks=[1], classes=["glioma", "meningioma", "notumor"])
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    labels = pd.Series(["glioma", "glioma", "meningioma", "notumor"])
    metrics = metrics_for(spec, labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(0.5)  # 2nd and 3rd are wrong types ...
    assert metrics["sensitivity"] == pytest.approx(1.0)  # ... but every tumour is still called a tumour
    assert metrics["specificity"] == pytest.approx(1.0)


def test_roc_points_are_the_best_sensitivity_at_a_specificity_and_the_reverse():
    from components.evaluate import roc_points

    is_tumour = np.array([0] * 10 + [1] * 10, bool)
    score = np.r_[np.linspace(0, 0.5, 10), 0.3, np.linspace(0.6, 1, 9)]  # negatives 0, 0.056, ..., 0.5; a tumour at 0.3
    assert roc_points(is_tumour, score, specificity=0.9, sensitivity=0.9) == {"sens_at_spec": 0.9, "spec_at_sens": 1.0}
    # every tumour found: the threshold drops to 0.3 and four negatives (0.33-0.5) are flagged
    assert roc_points(is_tumour, score, specificity=1.0, sensitivity=1.0) == {"sens_at_spec": 0.9, "spec_at_sens": pytest.approx(0.6)}
