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


def test_a_planted_resaved_copy_is_grouped_kept_in_one_split_and_caught_when_moved(tmp_path):
    from PIL import Image

    from components.config import IngestConfig
    from components.ingest import run as ingest

    rng = np.random.default_rng(0)
    for i in range(40):
        folder = tmp_path / "data" / ["notumor", "tumor"][i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    original = Image.open(tmp_path / "data" / "tumor" / "img1.png")
    original.save(tmp_path / "data" / "tumor" / "copy-of-img1.jpg", quality=85)  # a re-saved copy, as in Masoud
    manifest = ingest(IngestConfig(source=tmp_path / "data", out=tmp_path / "manifest.csv")).manifest
    is_copy = manifest["path"].str.contains("img1.png|copy-of-img1", regex=True)
    assert manifest.loc[is_copy, "duplicate_group"].nunique() == 1 and manifest["duplicate_group"].nunique() == 40
    assigned = assign(manifest, SplitConfig(seed=3))
    assert assigned.loc[is_copy, "split"].nunique() == 1
    moved = assigned.copy()
    moved.loc[is_copy.to_numpy().nonzero()[0][0], "split"] = "test" if assigned.loc[is_copy, "split"].iloc[0] != "test" else "train"
    with pytest.raises(TumorScopeError, match="duplicate_group"):
        check_no_leak(moved)


def test_feedback_rows_only_train_and_leave_the_test_split_fixed():
    config = SplitConfig(seed=2, folds=4)
    source = _manifest().assign(origin="source")
    before = assign(source, config)
    feedback = pd.DataFrame(
        [{"image_id": f"f{k}", "subject": f"fb{k}", "duplicate_group": f"fd{k}", "label": "tumor", "origin": "feedback"} for k in range(6)]
    )
    test_image = before.loc[before["split"] == "test", "image_id"].iloc[0]
    feedback.loc[0, "duplicate_group"] = before.loc[before["image_id"] == test_image, "duplicate_group"].iloc[
        0
    ]  # a re-upload of a test image
    after = assign(pd.concat([source, feedback], ignore_index=True), config)
    for part in ("test", "val"):
        assert set(after.loc[after["split"] == part, "image_id"]) == set(before.loc[before["split"] == part, "image_id"])
    added = after[after["origin"] == "feedback"]
    assert set(added["image_id"]) == {f"f{k}" for k in range(1, 6)} and set(added["split"]) == {"train"}
    check_no_leak(after)
