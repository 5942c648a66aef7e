"""How sure the test figures are: bootstrap 95 % intervals, per-class metrics and calibration on the test split.

A single held-out split of a few hundred images moves by several points from one draw to the next; a
figure without its interval invites over-reading. The bootstrap resamples the test images with replacement
(1,000 times by default) and reports the 2.5-97.5 percentiles of each metric.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd


def bootstrap_intervals(
    metric_fn: Callable[[np.ndarray], dict[str, float]], n: int, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``metric_fn(rows)`` on all rows and on resampled rows: {metric: {value, low, high}} (NaN-robust)."""
    rng = np.random.default_rng(seed)
    point = metric_fn(np.arange(n))
    draws = [metric_fn(rng.integers(0, n, n)) for _ in range(resamples)]
    intervals = {}
    for name, value in point.items():
        values = np.array([d[name] for d in draws], dtype=float)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan)
        intervals[name] = {"value": float(value), "low": float(low), "high": float(high)}
    return intervals


def per_class_table(labels: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall (sensitivity), F1, support, one-vs-rest ROC-AUC and PR-AUC for each class."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    rows = []
    for index, name in enumerate(classes):
        is_class = labels == name
        both = 0 < is_class.sum() < len(labels)
        rows.append(
            {
                "class": name,
                "precision": precision[index],
                "recall": recall[index],
                "f1": f1[index],
                "support": int(support[index]),
                "roc_auc_ovr": roc_auc_score(is_class, probabilities[:, index]) if both else np.nan,
                "pr_auc": average_precision_score(is_class, probabilities[:, index]) if both else np.nan,
            }
        )
    return pd.DataFrame(rows)


def reliability_table(is_positive: np.ndarray, score: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Observed frequency against mean predicted probability per equal-width bin (the reliability diagram)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(score, edges[1:-1]), 0, bins - 1)
    rows = [
        {
            "bin": b,
            "mean_predicted": float(score[which == b].mean()),
            "observed": float(is_positive[which == b].mean()),
            "count": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]
    return pd.DataFrame(rows)


def calibration_error(table: pd.DataFrame) -> float:
    """ECE of a reliability table: the count-weighted gap between predicted and observed."""
    return float((table["count"] * (table["mean_predicted"] - table["observed"]).abs()).sum() / table["count"].sum())
