import numpy as np
import pandas as pd
import pytest

from components.fairness import subgroup_table, summary, with_age_band


def test_age_bands_from_ages():
    bands = with_age_band(pd.DataFrame({"age": [25, 40, 59, 60, None]}))["age_band"].tolist()
    assert bands[:4] == ["<40", "40-59", "40-59", "60+"] and pd.isna(bands[4])


def test_per_group_sensitivity_specificity_and_worst_group():
    frame = pd.DataFrame({"sex": ["F"] * 6 + ["M"] * 6})
    truth = np.array([1, 1, 1, 1, 0, 0] + [1, 1, 1, 1, 0, 0], dtype=bool)
    predicted = np.array([1, 1, 1, 1, 0, 0] + [1, 1, 0, 0, 1, 0], dtype=bool)
    table = subgroup_table(frame, truth, predicted).set_index("group")
    assert table.loc["F", "sensitivity"] == pytest.approx(1.0) and table.loc["M", "sensitivity"] == pytest.approx(0.5)
    assert table.loc["M", "specificity"] == pytest.approx(0.5) and table.loc["M", "positives"] == 4
    figures = summary(table.reset_index(), min_group_size=6)
    assert figures["worst_subgroup_sensitivity"] == pytest.approx(0.5)
    assert figures["equalized_odds_gap"] == pytest.approx(0.5)
    assert summary(table.reset_index(), min_group_size=7) == {}


def test_no_subgroup_columns_give_an_empty_table():
    table = subgroup_table(pd.DataFrame({"x": [1, 2]}), np.array([True, False]), np.array([True, True]))
    assert table.empty and summary(table, 1) == {}
