"""The quality benchmark's own arithmetic: leak-free folds and the ROC points the targets name."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SPEC = importlib.util.spec_from_file_location("bench_quality", Path(__file__).parents[1] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(quality)


def test_folds_keep_subjects_and_near_duplicates_whole_and_hold_both_classes():
    subjects = np.repeat([f"p{i}" for i in range(10)], 6)
    manifest = pd.DataFrame(
        {
            "subject": subjects,
            "label": np.tile(["tumor", "tumor", "notumor", "notumor", "tumor", "notumor"], 10),
            "duplicate_group": ["shared" if i in (0, 6) else f"u{i}" for i in range(60)],  # p0 and p1 share a duplicate
        }
    )
    fold = quality.folds_of(manifest, folds=5, seed=0)
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    assert manifest.assign(fold=fold).groupby("subject")["fold"].nunique().max() == 1
    assert fold[0] == fold[6], "a near-duplicate across two patients puts both in one fold"
    for k in range(5):
        assert set(manifest.loc[fold == k, "label"]) == {"tumor", "notumor"}


def test_roc_points_are_the_best_sensitivity_at_a_specificity_and_the_reverse():
    is_tumour = np.array([0] * 10 + [1] * 10, bool)
    score = np.r_[np.linspace(0, 0.5, 10), 0.3, np.linspace(0.6, 1, 9)]  # negatives 0, 0.056, ..., 0.5; a tumour at 0.3
    assert quality.roc_points(is_tumour, score, level=0.9) == {"sens_at_spec": 0.9, "spec_at_sens": 1.0}
    # every tumour found: the threshold drops to 0.3 and four negatives (0.33-0.5) are flagged
    assert quality.roc_points(is_tumour, score, level=1.0) == {"sens_at_spec": 0.9, "spec_at_sens": pytest.approx(0.6)}
