"""Late fusion of the CNN with clinical columns: does a patient's age or sex add anything to the image?

A logistic regression on the CNN's tumour logit plus the clinical columns the data has (age standardised,
sex one-hot, a missing-value indicator each) is fitted on the validation split and scored on the test split
next to the image alone. The stacked model is reported, not served: it only earns a place in the endpoint
when it beats the image on the same test rows, and clinicians would then have to send those columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from components.classical import CLINICAL_COLUMNS

MIN_ROWS = 30  # validation rows with a tumour and a tumour-free class both present


def clinical_design(frame: pd.DataFrame, reference: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Model inputs (and their names) from ``columns`` of ``frame``, scaled and coded as in ``reference`` (the
    fitting rows)."""
    parts, names = [], []
    for column in columns:
        values, fitted = frame[column], reference[column]
        if column == "age":
            age, known = pd.to_numeric(values, errors="coerce"), pd.to_numeric(fitted, errors="coerce")
            parts.append(((age - known.mean()) / (float(known.std()) or 1.0)).fillna(0.0).to_numpy())
            names.append("age_z")
        else:
            for level in sorted(fitted.dropna().astype(str).unique())[1:]:  # the first level is the baseline
                parts.append((values.astype(str) == level).to_numpy(float))
                names.append(f"{column}={level}")
        parts.append(values.isna().to_numpy(float))
        names.append(f"{column}_missing")
    return (np.column_stack(parts) if parts else np.zeros((len(frame), 0))), names


def usable_columns(frame: pd.DataFrame) -> list[str]:
    """Clinical columns present and known for at least half the rows, with more than one value."""
    return [c for c in CLINICAL_COLUMNS if c in frame and frame[c].notna().mean() >= 0.5 and frame[c].nunique() > 1]


def late_fusion(val: pd.DataFrame, val_score: np.ndarray, test: pd.DataFrame, test_score: np.ndarray, is_tumour) -> dict:
    """Test ROC-AUC and PR-AUC of the image alone and of image + clinical columns; {} where the data has none."""
    from scipy.special import logit
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, roc_auc_score

    columns = usable_columns(val)
    val_tumour, test_tumour = is_tumour(val), is_tumour(test)
    if not columns or len(val) < MIN_ROWS or len(set(val_tumour)) < 2 or len(set(test_tumour)) < 2:
        return {}

    def design(frame: pd.DataFrame, score: np.ndarray) -> np.ndarray:
        return np.column_stack([logit(np.clip(score, 1e-6, 1 - 1e-6)), clinical_design(frame, val, columns)[0]])

    stacked = LogisticRegression(max_iter=1000).fit(design(val, val_score), val_tumour)
    fused = stacked.predict_proba(design(test, test_score))[:, 1]
    return {
        "columns": columns,
        "image_roc_auc": float(roc_auc_score(test_tumour, test_score)),
        "fusion_roc_auc": float(roc_auc_score(test_tumour, fused)),
        "image_pr_auc": float(average_precision_score(test_tumour, test_score)),
        "fusion_pr_auc": float(average_precision_score(test_tumour, fused)),
        "coefficients": dict(zip(["image_logit", *clinical_design(val, val, columns)[1]], stacked.coef_[0].round(4).tolist())),
    }
