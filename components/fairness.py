"""Subgroup metrics: does the model find tumours equally well for every sex, age band and site?

Built on fairlearn's MetricFrame. Groups smaller than ``min_group_size`` (or without
both classes) are reported but not used for the worst-group figure, since a
sensitivity from three patients says little.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import recall_score

SUBGROUP_COLUMNS = ("sex", "age_band", "site")
AGE_BANDS = ([0, 40, 60, 200], ["<40", "40-59", "60+"])


def with_age_band(frame: pd.DataFrame) -> pd.DataFrame:
    if "age" not in frame.columns or "age_band" in frame.columns:
        return frame
    bands = pd.cut(pd.to_numeric(frame["age"], errors="coerce"), AGE_BANDS[0], labels=AGE_BANDS[1], right=False)
    return frame.assign(age_band=bands.astype(str).replace("nan", np.nan))


def _specificity(y_true, y_pred) -> float:
    return recall_score(y_true, y_pred, pos_label=0, zero_division=np.nan)


def _sensitivity(y_true, y_pred) -> float:
    return recall_score(y_true, y_pred, pos_label=1, zero_division=np.nan)


def subgroup_table(frame: pd.DataFrame, is_tumour: np.ndarray, predicted_tumour: np.ndarray) -> pd.DataFrame:
    """One row per (subgroup column, group): n, positives, sensitivity, specificity."""
    from fairlearn.metrics import MetricFrame, count

    frame = with_age_band(frame.reset_index(drop=True))
    rows = []
    for column in (c for c in SUBGROUP_COLUMNS if c in frame.columns and frame[c].notna().any()):
        known = frame[column].notna().to_numpy()
        metric_frame = MetricFrame(
            metrics={"n": count, "sensitivity": _sensitivity, "specificity": _specificity},
            y_true=is_tumour[known].astype(int),
            y_pred=predicted_tumour[known].astype(int),
            sensitive_features=frame.loc[known, column].astype(str),
        )
        table = metric_frame.by_group.reset_index().rename(columns={column: "group"})
        positives = pd.Series(is_tumour[known]).groupby(frame.loc[known, column].astype(str).to_numpy()).sum()
        table["positives"] = table["group"].map(positives).fillna(0).astype(int)
        table["n"] = table["n"].astype(int)
        rows.append(table.assign(subgroup=column))
    columns = ["subgroup", "group", "n", "positives", "sensitivity", "specificity"]
    return pd.concat(rows, ignore_index=True)[columns] if rows else pd.DataFrame(columns=columns)


def summary(table: pd.DataFrame, min_group_size: int) -> dict[str, float]:
    """Worst-group sensitivity and the largest sensitivity/specificity gap (equalized odds) among groups big enough to judge."""
    judged = table[(table["n"] >= min_group_size) & (table["positives"] > 0) & (table["n"] > table["positives"])]
    if judged.empty:
        return {}
    gaps = judged.groupby("subgroup").agg(
        sensitivity_gap=("sensitivity", lambda s: s.max() - s.min()), specificity_gap=("specificity", lambda s: s.max() - s.min())
    )
    return {
        "worst_subgroup_sensitivity": float(judged["sensitivity"].min()),
        "worst_subgroup_specificity": float(judged["specificity"].min()),
        "equalized_odds_gap": float(gaps.max().max()),
    }
