"""Late fusion: it finds what the clinical columns add, and stays out where the data has none."""

import numpy as np
import pandas as pd

from components.fusion import clinical_design, late_fusion


def _cohort(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Older patients have tumours more often; the image score alone is noisy."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n)
    tumour = rng.random(n) < 1 / (1 + np.exp(-(age - 50) / 5))
    score = 1 / (1 + np.exp(-(tumour * 1.0 + rng.normal(0, 1.2, n) - 0.5)))
    frame = pd.DataFrame({"age": age, "sex": rng.choice(["F", "M"], n), "label": np.where(tumour, "tumor", "notumor")})
    frame.loc[frame.sample(frac=0.1, random_state=seed).index, "age"] = np.nan
    return frame, score


def _is_tumour(frame: pd.DataFrame) -> np.ndarray:
    return (frame["label"] != "notumor").to_numpy()


def test_fusion_gains_where_age_carries_information_and_reports_both():
    (val, val_score), (test, test_score) = _cohort(400, 0), _cohort(400, 1)
    result = late_fusion(val, val_score, test, test_score, _is_tumour)
    assert result["columns"] == ["age", "sex"]
    assert result["fusion_roc_auc"] > result["image_roc_auc"] + 0.05
    assert result["coefficients"]["age_z"] > 0.5 and abs(result["coefficients"]["sex=M"]) < 0.5


def test_no_clinical_columns_no_fusion():
    (val, val_score), (test, test_score) = _cohort(100, 0), _cohort(100, 1)
    assert late_fusion(val[["label"]], val_score, test[["label"]], test_score, _is_tumour) == {}


def test_design_codes_missing_values_and_unseen_levels_without_failing():
    reference = pd.DataFrame({"age": [30.0, 50.0, 70.0], "sex": ["F", "M", "F"]})
    frame = pd.DataFrame({"age": [np.nan, 50.0], "sex": [None, "X"]})
    design, names = clinical_design(frame, reference, ["age", "sex"])
    assert names == ["age_z", "age_missing", "sex=M", "sex_missing"]
    np.testing.assert_allclose(design, [[0, 1, 0, 1], [0, 0, 0, 0]])
