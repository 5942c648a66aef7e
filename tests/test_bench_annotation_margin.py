"""The annotation-margin benchmark's arithmetic: slice distances within a series, never across series."""

import numpy as np
import pandas as pd
import pytest

from tests.conftest import bench_module

margin = bench_module("annotation_margin")


def test_each_slice_is_measured_to_the_nearest_annotated_slice_of_its_own_series():
    rows = pd.DataFrame(
        {
            "series": ["a"] * 6 + ["b"] * 3,
            "slice": [1, 2, 3, 4, 5, 6, 1, 2, 3],
            "label": ["notumor", "notumor", "tumor", "tumor", "notumor", "notumor", "notumor", "notumor", "notumor"],
        }
    ).sample(frac=1, random_state=0)  # order on disk says nothing
    distance = pd.Series(margin.distance_to_annotation(rows), index=rows.index).sort_index()
    assert distance.tolist() == [2, 1, 0, 0, 1, 2, np.inf, np.inf, np.inf], "series b has no tumour: nothing is near one"


def test_fold_rows_read_the_slice_number_and_series_folder_and_refuse_other_names(tmp_path):
    pd.DataFrame(
        {"image_id": ["i1", "i2"], "subject": ["s", "s"], "label": ["tumor", "notumor"], "fold": [0, 0], "p_tumour": [0.9, 0.1]}
    ).to_csv(tmp_path / "test_scores.csv", index=False)
    pd.DataFrame({"image_id": ["i1", "i2"], "path": ["/d/CASE_1/CASE_1_12.png", "/d/CASE_1/CASE_1_3.png"]}).to_csv(
        tmp_path / "manifest.csv", index=False
    )
    rows = margin.fold_rows(tmp_path)
    assert rows["slice"].tolist() == [12, 3] and set(rows["series"]) == {"CASE_1"} and "path" not in rows
    pd.DataFrame({"image_id": ["i1", "i2"], "path": ["/d/x/a.png", "/d/x/b.png"]}).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(SystemExit, match="without a slice number"):
        margin.fold_rows(tmp_path)
