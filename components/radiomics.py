"""Hand-crafted radiomic features of a 2D slice, and four ways to rank them.

They give a cheap, interpretable baseline beside the CNN and a view of what
separates the classes. Texture comes from scikit-image and PyWavelets; only the
run-length matrix is written here (see ``glrlm``), because pyradiomics, which
has it, does not install in this environment.

Heavy libraries are imported inside the functions so importing this module (and
so ``tumorscope --help``) stays cheap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# The floor of the brain-foreground threshold on an image scaled to [0, 1] (see `brain_mask`); it
# matches the `foreground` statistic of components.imaging.
FOREGROUND_THRESHOLD = 0.05
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
GLRLM_NAMES = ("short_run_emphasis", "long_run_emphasis", "gray_level_nonuniformity", "run_length_nonuniformity", "run_percentage")
LBP_POINTS, LBP_RADIUS = 8, 1
WAVELET, WAVELET_LEVEL = "haar", 2
FIRST_NAMES = ("mean", "std", "skewness", "kurtosis", "entropy", "p10", "p50", "p90", "energy", "range")
SHAPE_NAMES = ("area_fraction", "eccentricity", "solidity", "extent")
LESION_NAMES = ("area_fraction", "eccentricity", "solidity", "mean", "std")
SELECTION_METHODS = ("anova", "rfe", "l1", "tree")


def _wavelet_bands() -> list[str]:
    bands = [f"a{WAVELET_LEVEL}"]
    for level in range(WAVELET_LEVEL, 0, -1):
        bands += [f"h{level}", f"v{level}", f"d{level}"]
    return bands


FEATURE_NAMES: tuple[str, ...] = (
    *(f"first_{n}" for n in FIRST_NAMES),
    *(f"glcm_{p.lower()}" for p in GLCM_PROPS),
    *(f"glrlm_{n}" for n in GLRLM_NAMES),
    *(f"lbp_{b}" for b in range(LBP_POINTS + 2)),
    *(f"shape_{n}" for n in SHAPE_NAMES),
    *(f"lesion_{n}" for n in LESION_NAMES),
    *(f"wavelet_{band}_{stat}" for band in _wavelet_bands() for stat in ("mean_abs", "std")),
)


def image_features(image: np.ndarray, mask: np.ndarray | None = None, levels: int = 32) -> dict[str, float]:
    """All features of one slice, always the keys of ``FEATURE_NAMES`` in that order.

    ``image`` is 2D in [0, 1]; ``mask`` an optional lesion mask of the same shape. A value that is
    undefined for this image is NaN, never an error: statistics of an empty foreground (a blank
    slice), skewness and kurtosis of a constant foreground, and every ``lesion_`` column when the
    mask is absent or empty. GLCM correlation of a constant region is 1 (scikit-image's convention).
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {image.shape}")
    foreground = brain_mask(image)
    quantised = quantise(image, foreground, levels)
    features = {
        **_first_order(image[foreground], levels),
        **_glcm(quantised, levels),
        **{f"glrlm_{k}": v for k, v in glrlm(quantised).items()},
        **_lbp(image, foreground),
        **_shape(foreground),
        **_lesion(image, mask),
        **_wavelet(image),
    }
    return {name: float(features[name]) for name in FEATURE_NAMES}


def brain_mask(image: np.ndarray) -> np.ndarray:
    """The head, so that air and its noise stay out of every statistic.

    Pixels above Otsu's threshold (never below ``FOREGROUND_THRESHOLD``); the largest connected
    piece is kept, so specks of noise in the air drop out, and its holes are filled, so dark
    ventricles and necrotic cores count as brain. A fixed small threshold alone is not enough:
    after ``imaging.prepare`` the air of the synthetic cohort averages about 0.06 and peaks near
    0.18. Empty for a constant or blank image.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if image.max() - image.min() < 1e-6:
        return np.zeros(image.shape, dtype=bool)
    above = image > max(FOREGROUND_THRESHOLD, threshold_otsu(image))
    pieces, count = ndimage.label(above, structure=np.ones((3, 3)))  # 8-connected: fine textures touch diagonally
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    largest = np.bincount(pieces.ravel())[1:].argmax() + 1
    return ndimage.binary_fill_holes(pieces == largest)


def quantise(image: np.ndarray, foreground: np.ndarray, levels: int) -> np.ndarray:
    """Gray levels 1..levels on the foreground and 0 off it, so texture matrices can drop the background."""
    quantised = np.minimum((image * levels).astype(np.int64), levels - 1) + 1
    return np.where(foreground, quantised, 0).astype(np.uint16)


def _first_order(values: np.ndarray, levels: int) -> dict[str, float]:
    from scipy.stats import kurtosis, skew

    names = [f"first_{n}" for n in FIRST_NAMES]
    if values.size == 0:
        return dict.fromkeys(names, np.nan)
    std = values.std()
    flat = std < 1e-12  # skewness and kurtosis divide by the spread: undefined on a constant region
    counts = np.histogram(values, bins=levels, range=(0.0, 1.0))[0]
    p = counts[counts > 0] / values.size
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    stats = (
        values.mean(),
        std,
        np.nan if flat else skew(values),
        np.nan if flat else kurtosis(values),
        -(p * np.log2(p)).sum(),
        p10,
        p50,
        p90,
        np.mean(values**2),  # per pixel, so it does not grow with the size of the head
        values.max() - values.min(),
    )
    return dict(zip(names, stats))


def _glcm(quantised: np.ndarray, levels: int) -> dict[str, float]:
    from skimage.feature import graycomatrix, graycoprops

    names = [f"glcm_{p.lower()}" for p in GLCM_PROPS]
    matrix = graycomatrix(quantised, distances=GLCM_DISTANCES, angles=GLCM_ANGLES, levels=levels + 1, symmetric=True)
    matrix = matrix[1:, 1:]  # drop pairs that touch the background (level 0)
    used = matrix.sum(axis=(0, 1)) > 0
    if not used.any():
        return dict.fromkeys(names, np.nan)
    return {name: float(graycoprops(matrix, prop)[used].mean()) for name, prop in zip(names, GLCM_PROPS)}


def _runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gray level, length) of every run along the rows of ``rows``; level 0 (background) runs are dropped."""
    separated = np.pad(rows.astype(np.int64), ((0, 0), (0, 1)), constant_values=-1).ravel()
    starts = np.flatnonzero(np.diff(separated, prepend=-2) != 0)
    lengths = np.diff(np.append(starts, separated.size))
    values = separated[starts]
    keep = values > 0
    return values[keep], lengths[keep]


def glrlm(quantised: np.ndarray) -> dict[str, float]:
    """Gray-level run-length features, averaged over horizontal (0°) and vertical (90°) runs.

    Written here because scikit-image has no run-length matrix and pyradiomics, which has, does
    not install in this environment (its sdist fails to build). Same definitions as pyradiomics,
    with both non-uniformities normalised by the squared run count (its ``...Normalized``
    variants), so they do not scale with the size of the head. ``quantised`` holds levels 1..L
    on the region and 0 off it; NaN when the region is empty.
    """
    pixels = int((quantised > 0).sum())
    if pixels == 0:
        return dict.fromkeys(GLRLM_NAMES, np.nan)
    per_direction = []
    for rows in (quantised, quantised.T):
        values, lengths = _runs(rows)
        matrix = np.zeros((int(values.max()) + 1, int(lengths.max()) + 1))
        np.add.at(matrix, (values, lengths), 1)
        runs = matrix.sum()
        j = np.arange(matrix.shape[1], dtype=np.float64)
        j[0] = 1  # column 0 is always empty: avoids 0/0
        per_length, per_level = matrix.sum(axis=0), matrix.sum(axis=1)
        per_direction.append(
            (
                (per_length / j**2).sum() / runs,
                (per_length * j**2).sum() / runs,
                (per_level**2).sum() / runs**2,
                (per_length**2).sum() / runs**2,
                runs / pixels,
            )
        )
    return dict(zip(GLRLM_NAMES, np.mean(per_direction, axis=0)))


def _lbp(image: np.ndarray, foreground: np.ndarray) -> dict[str, float]:
    from skimage.feature import local_binary_pattern

    bins = LBP_POINTS + 2  # uniform patterns 0..P, plus one bin for all non-uniform ones
    names = [f"lbp_{b}" for b in range(bins)]
    if not foreground.any():
        return dict.fromkeys(names, np.nan)
    # integer gray values: on floats, tiny rounding differences between neighbours flip bits
    codes = local_binary_pattern(np.round(image * 255).astype(np.uint8), LBP_POINTS, LBP_RADIUS, method="uniform")
    counts = np.bincount(codes[foreground].astype(np.int64), minlength=bins)
    return dict(zip(names, counts / counts.sum()))


def _region(mask: np.ndarray) -> tuple[float, float, float]:
    """Eccentricity, solidity and extent of all of ``mask`` taken as one region."""
    from skimage.measure import regionprops

    (region,) = regionprops(mask.astype(np.uint8))
    return region.eccentricity, region.solidity, region.extent


def _shape(foreground: np.ndarray) -> dict[str, float]:
    eccentricity, solidity, extent = _region(foreground) if foreground.any() else (np.nan,) * 3
    return {
        "shape_area_fraction": foreground.mean(),
        "shape_eccentricity": eccentricity,
        "shape_solidity": solidity,
        "shape_extent": extent,
    }


def _lesion(image: np.ndarray, mask: np.ndarray | None) -> dict[str, float]:
    names = [f"lesion_{n}" for n in LESION_NAMES]
    if mask is None or not np.asarray(mask).any():
        return dict.fromkeys(names, np.nan)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    eccentricity, solidity, _ = _region(mask)
    inside = image[mask]
    return dict(zip(names, (mask.mean(), eccentricity, solidity, inside.mean(), inside.std())))


def _wavelet(image: np.ndarray) -> dict[str, float]:
    import pywt

    # over the whole grid, not the head: a transform needs a full rectangle, and the head's outline is signal too
    approximation, *details = pywt.wavedec2(image, WAVELET, level=WAVELET_LEVEL)
    bands = [approximation, *(band for level in details for band in level)]
    features = {}
    for name, band in zip(_wavelet_bands(), bands):
        features[f"wavelet_{name}_mean_abs"] = np.abs(band).mean()
        features[f"wavelet_{name}_std"] = band.std()
    return features


def select_features(table: pd.DataFrame, labels: pd.Series, top_k: int, seed: int) -> pd.DataFrame:
    """Rank features by four methods that fail differently, and keep the top ``top_k`` by mean rank.

    A filter (ANOVA F), a wrapper (RFE on a logistic regression), an embedded sparse model (L1
    logistic regression; |coef| summed over classes) and a non-linear one (extra-trees importance)
    agree on a feature only when it carries signal. Constant and all-NaN columns are dropped; NaN
    is imputed with the median of ``table``, so pass training rows only. Rank 1 is best.
    """
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.feature_selection import RFE, f_classif
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    usable = table.loc[:, table.notna().any() & (table.nunique(dropna=True) > 1)].astype(np.float64)
    if usable.shape[1] == 0:
        raise ValueError("no feature varies across the rows: nothing to rank")
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        raise ValueError("feature selection needs at least two classes")
    x = StandardScaler().fit_transform(usable.fillna(usable.median()))
    n = x.shape[1]
    scores = {
        "anova": np.nan_to_num(f_classif(x, y)[0], nan=0.0, posinf=np.finfo(np.float64).max),
        "rfe": n + 1 - RFE(LogisticRegression(max_iter=2000), n_features_to_select=1, step=1).fit(x, y).ranking_,
        # C fixed at 0.1 on standardised features: sparse enough to rank, no inner search to pay for
        "l1": np.abs(LogisticRegression(l1_ratio=1.0, solver="saga", C=0.1, max_iter=5000, random_state=seed).fit(x, y).coef_).sum(axis=0),
        "tree": ExtraTreesClassifier(n_estimators=200, n_jobs=1, random_state=seed).fit(x, y).feature_importances_,
    }
    result = pd.DataFrame({"feature": usable.columns})
    for method, score in scores.items():
        result[f"{method}_score"] = score
    for method in scores:
        result[f"{method}_rank"] = result[f"{method}_score"].rank(ascending=False, method="average")
    result["mean_rank"] = result[[f"{m}_rank" for m in scores]].mean(axis=1)
    result = result.sort_values(["mean_rank", "feature"], kind="stable").reset_index(drop=True)
    result["selected"] = result.index < top_k
    return result
