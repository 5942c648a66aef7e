import numpy as np
import pandas as pd
import pytest

from components.config import SplitConfig
from components.errors import TumorScopeError
from components.split import assign, check_no_leak, leakage_groups


def _manifest(n_subjects: int = 40) -> pd.DataFrame:
    rows = []
    for s in range(n_subjects):
        for k in range(3):
            rows.append({"image_id": f"i{s}-{k}", "subject": f"s{s}", "duplicate_group": f"d{s}-{k}", "label": ["notumor", "tumor"][s % 2]})
    frame = pd.DataFrame(rows)
    frame.loc[frame["image_id"] == "i1-0", "duplicate_group"] = "d2-0"  # a copy shared by subjects 1 and 2
    return frame


def test_groups_join_subjects_through_shared_duplicates():
    groups = leakage_groups(_manifest())
    manifest = _manifest()
    assert len(set(groups[manifest["subject"].isin(["s1", "s2"])])) == 1
    assert len(np.unique(groups)) == 39


def test_split_is_leak_free_stratified_and_stable():
    config = SplitConfig(val_fraction=0.15, test_fraction=0.2, seed=1)
    first, second = assign(_manifest(), config), assign(_manifest(), config)
    assert first["split"].tolist() == second["split"].tolist()
    check_no_leak(first)
    counts = first.groupby("split")["label"].value_counts().unstack()
    assert set(first["split"]) == {"train", "val", "test"}
    assert (counts > 0).all().all()
    assert 0.1 < (first["split"] == "test").mean() < 0.3


def test_folds_cover_train_and_val_and_keep_groups_whole():
    assigned = assign(_manifest(), SplitConfig(folds=4))
    outside_test = assigned[assigned["split"] != "test"]
    assert set(outside_test["fold"]) == {0, 1, 2, 3}
    assert (assigned.loc[assigned["split"] == "test", "fold"] == -1).all()
    assert outside_test.groupby("group")["fold"].nunique().max() == 1


def test_leak_check_catches_a_subject_spanning_splits():
    assigned = assign(_manifest(), SplitConfig())
    test_subject = assigned.loc[assigned["split"] == "test", "subject"].iloc[0]
    assigned.loc[(assigned["subject"] == test_subject).to_numpy().nonzero()[0][0], "split"] = "train"
    with pytest.raises(TumorScopeError, match="subject"):
        check_no_leak(assigned)


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(TumorScopeError, match="too few"):
        assign(_manifest(2), SplitConfig())
