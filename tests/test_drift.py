import numpy as np
import pandas as pd

from components.drift import DriftDetector


def _frame(rng, n: int, shift: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "a": rng.normal(shift, 1, n),
            "b": rng.normal(2 * shift, 1, n),
            "c": rng.normal(0, 1, n),
            "label": rng.choice(["x", "y"], n),
        }
    )


def test_shifted_columns_are_found_and_unshifted_data_is_quiet():
    rng = np.random.default_rng(0)
    detector = DriftDetector(["a", "b", "c"], ["label"], drift_share=0.5).fit(_frame(rng, 300))
    same = detector.score(_frame(rng, 200))
    moved = detector.score(_frame(rng, 200, shift=1.0))
    assert same.drifted_share < 0.5
    assert set(moved.drifted_columns) >= {"a", "b"} and moved.drifted_share >= 0.5
    assert moved.p_values["a"] < 0.05 < same.p_values["c"]


def test_large_samples_keep_the_p_value_reading_the_right_way_round():
    rng = np.random.default_rng(1)
    detector = DriftDetector(["a", "b", "c"], ["label"], drift_share=0.5).fit(_frame(rng, 1500))
    assert detector.score(_frame(rng, 1200)).drifted_share < 0.5
    assert {"a", "b"} <= set(detector.score(_frame(rng, 1200, shift=0.5)).drifted_columns)
