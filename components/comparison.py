"""Is the challenger worse than the champion, or only unlucky on this test set?

Both models are scored on the same test images, so the comparison is paired: resampling the
images (bootstrap) gives the distribution of the difference in each compared metric. The
challenger counts as worse only when it is below the champion by more than the tolerance in at
least 95 % of the resamples (a one-sided 95 % bound), so one or two images that flip between
two equally good models do not decide a promotion, and a real loss still does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.fairness import SUBGROUP_COLUMNS, with_age_band

RESAMPLES, CONFIDENCE = 500, 0.95


@dataclass(frozen=True)
class Difference:
    metric: str
    challenger: float
    champion: float
    upper_bound: float  # of (challenger − champion), one-sided 95 %

    def worse(self, tolerance: float) -> bool:
        return self.upper_bound < -tolerance


def _accuracy(correct: np.ndarray, rows: np.ndarray) -> float:
    return float(correct[rows].mean())


def _auc(is_tumour: np.ndarray, score: np.ndarray, rows: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = is_tumour[rows]
    return float(roc_auc_score(labels, score[rows])) if 0 < labels.sum() < len(labels) else np.nan


def _worst_group_sensitivity(groups: list[np.ndarray], is_tumour: np.ndarray, detected: np.ndarray, rows: np.ndarray) -> float:
    """Minimum sensitivity over the judged subgroups, on the resampled rows."""
    counts = np.bincount(rows, minlength=len(is_tumour))
    values = []
    for members in groups:
        weight = counts * members * is_tumour
        values.append((weight * detected).sum() / weight.sum() if weight.sum() else np.nan)
    return float(np.nanmin(values)) if values and not np.all(np.isnan(values)) else np.nan


def judged_groups(test: pd.DataFrame, is_tumour: np.ndarray, min_group_size: int) -> list[np.ndarray]:
    """Boolean membership of each subgroup big enough to judge (as in the fairness report)."""
    frame = with_age_band(test.reset_index(drop=True))
    groups = []
    for column in (c for c in SUBGROUP_COLUMNS if c in frame and frame[c].notna().any()):
        for _, members in frame.groupby(column).groups.items():
            mask = np.zeros(len(frame), bool)
            mask[np.asarray(members)] = True
            if mask.sum() >= min_group_size and 0 < is_tumour[mask].sum() < mask.sum():
                groups.append(mask)
    return groups


def paired_differences(
    test: pd.DataFrame, challenger: pd.DataFrame, champion: pd.DataFrame, min_group_size: int, seed: int = 0
) -> list[Difference]:
    """Accuracy, ROC-AUC and worst-subgroup sensitivity of both models, with the bound of their difference.

    ``challenger`` and ``champion`` hold ``predicted`` and ``tumour_probability`` per test row, in ``test``'s order."""
    from components.config import NO_TUMOUR

    labels = test["label"].to_numpy()
    is_tumour = (labels != NO_TUMOUR).astype(int)
    groups = judged_groups(test, is_tumour, min_group_size)
    models = {}
    for name, scored in (("challenger", challenger), ("champion", champion)):
        correct = (scored["predicted"].to_numpy() == labels).astype(float)
        score = scored["tumour_probability"].to_numpy()
        detected = (scored["predicted"].to_numpy() != NO_TUMOUR).astype(float)  # each model at its own operating threshold
        models[name] = {
            "accuracy": lambda rows, c=correct: _accuracy(c, rows),
            "roc_auc": lambda rows, s=score: _auc(is_tumour, s, rows),
            "worst_subgroup_sensitivity": lambda rows, d=detected: _worst_group_sensitivity(groups, is_tumour, d, rows),
        }
    rng = np.random.default_rng(seed)
    resamples = [rng.integers(0, len(test), len(test)) for _ in range(RESAMPLES)]
    everything = np.arange(len(test))
    differences = []
    for metric in ("accuracy", "roc_auc", "worst_subgroup_sensitivity"):
        if metric == "worst_subgroup_sensitivity" and not groups:
            continue
        ours, theirs = models["challenger"][metric], models["champion"][metric]
        deltas = np.array([ours(rows) - theirs(rows) for rows in resamples])
        bound = float(np.nanquantile(deltas, CONFIDENCE)) if np.isfinite(deltas).any() else np.nan
        differences.append(Difference(metric, ours(everything), theirs(everything), bound))
    return differences
