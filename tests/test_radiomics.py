from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.radiomics import FEATURE_NAMES, brain_mask, glrlm, image_features, quantise, select_features

SIZE = 128


def _phantom(texture: np.ndarray, radius: int = 50) -> np.ndarray:
    """``texture`` inside a disc on a black background: a head in air."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < radius**2
    return np.where(disc, texture, 0.0)


def _noise(seed: int = 0) -> np.ndarray:
    return _phantom(np.random.default_rng(seed).uniform(0.2, 1.0, (SIZE, SIZE)))


def _lesion_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[50:62, 55:70] = True
    return mask


def _is_lesion(name: str) -> bool:
    return name.startswith("lesion_")


def test_keys_are_fixed_and_ordered_whatever_the_input():
    inputs = [(_noise(), None), (_noise(), _lesion_mask()), (np.zeros((SIZE, SIZE)), None), (np.full((64, 64), 0.5), np.zeros((64, 64)))]
    for image, mask in inputs:
        assert tuple(image_features(image, mask)) == FEATURE_NAMES
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    for prefix in ("first_", "glcm_", "glrlm_", "lbp_", "shape_", "lesion_", "wavelet_"):
        assert any(name.startswith(prefix) for name in FEATURE_NAMES)


def test_textured_image_gives_finite_values_and_is_deterministic():
    first, second = image_features(_noise(), None), image_features(_noise(), None)
    assert all(np.isfinite(v) for k, v in first.items() if not _is_lesion(k))
    np.testing.assert_array_equal(list(first.values()), list(second.values()))
    assert first["lbp_0"] + sum(first[f"lbp_{b}"] for b in range(1, 10)) == pytest.approx(1.0)


def test_brain_mask_excludes_noisy_air_and_fills_holes():
    rng = np.random.default_rng(1)
    image = _phantom(np.full((SIZE, SIZE), 0.8)) + rng.uniform(0, 0.12, (SIZE, SIZE))  # air noise above 0.05
    image[60:68, 60:68] = 0.02  # a dark "ventricle" inside the head
    mask = brain_mask(image)
    assert not mask[:10, :10].any()
    assert mask[60:68, 60:68].all()


def test_constant_images_do_not_crash_and_undefined_values_are_nan():
    for value in (0.0, 0.5):
        features = image_features(np.full((SIZE, SIZE), value))
        # a constant image has no head to find: foreground statistics are undefined
        assert np.isnan(features["first_mean"]) and np.isnan(features["glcm_contrast"]) and np.isnan(features["glrlm_run_percentage"])
        assert features["shape_area_fraction"] == 0.0
        assert np.isfinite(features["wavelet_a2_mean_abs"])


def test_constant_head_gives_zero_contrast_and_nan_skewness():
    features = image_features(_phantom(np.full((SIZE, SIZE), 0.6)))
    assert features["first_std"] == pytest.approx(0.0)
    assert np.isnan(features["first_skewness"]) and np.isnan(features["first_kurtosis"])
    assert features["glcm_contrast"] == 0.0
    assert features["glrlm_gray_level_nonuniformity"] == pytest.approx(1.0)


def test_lesion_columns_are_nan_without_a_mask_and_finite_with_one():
    lesion_names = [n for n in FEATURE_NAMES if _is_lesion(n)]
    for mask in (None, np.zeros((SIZE, SIZE), dtype=bool)):
        features = image_features(_noise(), mask)
        assert all(np.isnan(features[n]) for n in lesion_names)
    features = image_features(_noise(), _lesion_mask())
    assert all(np.isfinite(features[n]) for n in lesion_names)
    assert features["lesion_area_fraction"] == pytest.approx(_lesion_mask().mean())


def test_glcm_contrast_is_higher_for_a_checkerboard_than_a_gradient():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    checkerboard = _phantom(np.where((yy + xx) % 2 == 0, 0.3, 0.9))
    gradient = _phantom(0.2 + 0.7 * xx / SIZE)
    assert image_features(checkerboard)["glcm_contrast"] > 10 * image_features(gradient)["glcm_contrast"]


def test_glrlm_long_run_emphasis_is_higher_for_stripes_than_noise():
    xx = np.mgrid[:SIZE, :SIZE][1]
    stripes, noise = _phantom(np.where(xx // 4 % 2 == 0, 0.3, 0.9)), _noise()
    stripe_runs, noise_runs = image_features(stripes), image_features(noise)
    assert stripe_runs["glrlm_long_run_emphasis"] > 10 * noise_runs["glrlm_long_run_emphasis"]
    assert stripe_runs["glrlm_short_run_emphasis"] < noise_runs["glrlm_short_run_emphasis"]


def test_glrlm_counts_runs_exactly():
    quantised = np.array([[1, 1, 2], [0, 3, 3]])  # 0 is background
    # horizontal runs: (1,len 2) (2,1) (3,2); vertical runs: (1,1) (1,1) (3,1) (2,1) (3,1)
    features = glrlm(quantised)
    sre = ((1 / 4 + 1 + 1 / 4) / 3 + 1.0) / 2
    lre = ((4 + 1 + 4) / 3 + 1.0) / 2
    assert features["short_run_emphasis"] == pytest.approx(sre)
    assert features["long_run_emphasis"] == pytest.approx(lre)
    assert features["run_percentage"] == pytest.approx((3 / 5 + 5 / 5) / 2)
    assert features["gray_level_nonuniformity"] == pytest.approx(((1 + 1 + 1) / 9 + (4 + 1 + 4) / 25) / 2)


def test_quantise_puts_background_at_level_zero():
    image = np.array([[0.0, 0.5], [0.999, 1.0]])
    assert quantise(image, image > 0.05, 32).tolist() == [[0, 17], [32, 32]]


def _planted(n_classes: int, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    labels = np.arange(240) % n_classes
    table = pd.DataFrame(rng.normal(size=(240, 30)), columns=[f"noise_{i}" for i in range(30)])
    table["informative"] = labels + rng.normal(scale=0.3, size=240)
    table["constant"] = 1.0
    table["empty"] = np.nan
    table.loc[::7, "noise_3"] = np.nan  # imputed, not fatal
    return table, pd.Series(np.array(["a", "b", "c"])[labels])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_select_features_ranks_a_planted_feature_first(n_classes: int):
    table, labels = _planted(n_classes)
    selection = select_features(table, labels, top_k=5, seed=0)
    assert selection.loc[0, "feature"] == "informative"
    assert (selection.loc[0, [f"{m}_rank" for m in ("anova", "rfe", "l1", "tree")]] == 1).all()
    assert selection["selected"].sum() == 5 and selection["selected"].head(5).all()
    assert not {"constant", "empty"} & set(selection["feature"])
    assert len(selection) == 31 and selection["mean_rank"].is_monotonic_increasing


def test_select_features_is_deterministic_for_a_seed():
    table, labels = _planted(3, seed=4)
    pd.testing.assert_frame_equal(select_features(table, labels, 3, seed=7), select_features(table, labels, 3, seed=7))
