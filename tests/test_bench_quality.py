"""The quality benchmark's own arithmetic: leak-free folds and the roles of their images."""

import numpy as np
import pandas as pd

from tests.conftest import bench_module

quality = bench_module("quality")


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


def test_fold_roles_test_one_fold_and_validate_on_a_grouped_part_of_the_next():
    subjects = np.repeat([f"p{i}" for i in range(20)], 4)
    manifest = pd.DataFrame(
        {"subject": subjects, "label": np.tile(["tumor", "notumor"], 40), "duplicate_group": [f"u{i}" for i in range(80)]}
    )
    fold = quality.folds_of(manifest, folds=5, seed=0)
    first, second = manifest.loc[fold == 0, "subject"].unique()[:2]  # a near-duplicate links two patients of the next fold
    manifest.loc[manifest.index[manifest["subject"] == first][0], "duplicate_group"] = "shared"
    manifest.loc[manifest.index[manifest["subject"] == second][0], "duplicate_group"] = "shared"
    whole = quality.fold_roles(manifest, fold, k=4, val_parts=1, seed=0)
    assert (whole == "test").sum() == (fold == 4).sum() and set(np.flatnonzero(whole == "val")) == set(np.flatnonzero(fold == 0))
    half = quality.fold_roles(manifest, fold, k=4, val_parts=2, seed=0)
    assert (half == "test").tolist() == (whole == "test").tolist(), "the same test fold"
    validating = manifest.loc[half == "val"]
    assert 0 < validating["subject"].nunique() < manifest.loc[fold == 0, "subject"].nunique(), "a part of the next fold"
    assert set(validating["label"]) == {"tumor", "notumor"} and (fold[half == "val"] == 0).all()
    assert not set(validating["subject"]) & set(manifest.loc[half == "train", "subject"]), "no patient in two roles"
    assert (half[manifest["subject"] == first][0] == half[manifest["subject"] == second]).all(), "linked patients: one role"
