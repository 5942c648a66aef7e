"""Early detection: how small a tumour the model still finds.

Synthetic lesions (the synthetic cohort's lesion model: necrotic core, enhancing rim, oedema, irregular
outline) of decreasing diameter are inserted into real tumour-free test slices, and each lesioned slice is
classified at the model's operating threshold. The curve is the detection rate per diameter, next to the
false-positive rate of the same slices without a lesion. Its summary, the smallest diameter from which every
larger one is detected in at least 90 % of slices, is a gate criterion (``register.max_smallest_lesion_mm``).

Diameters are in millimetres for a 220 mm field of view across the image width (as in the synthetic
cohort); slices without spacing information are read that way. The inserted lesion has one appearance: the
curve measures sensitivity to that appearance, not to every tumour type.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from components.model import Classifier, tumour_probability
from components.synth import FIELD_OF_VIEW_MM, _lesion_maps

DIAMETERS_MM = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
DETECTION_LEVEL = 0.9


def brain_of(image: np.ndarray) -> np.ndarray:
    """The head's largest non-background component, holes filled, rim eroded: where a lesion may go."""
    foreground = ndimage.binary_fill_holes(image > 0.05)
    labels, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    largest = labels == (np.bincount(labels.ravel())[1:].argmax() + 1)
    return ndimage.binary_erosion(largest, iterations=max(1, image.shape[0] // 32))


def insert_lesion(image: np.ndarray, diameter_mm: float, rng: np.random.Generator) -> np.ndarray | None:
    """The slice with one lesion of about ``diameter_mm`` inside its brain (None when there is no room).
    A colour (multi-sequence) slice gets the same lesion in every channel, scaled to that channel's tissue."""
    from components.imaging import gray

    brain = brain_of(gray(image))
    if brain.sum() < 50:
        return None
    core, rim, oedema, _ = _lesion_maps(rng, brain, diameter_mm * image.shape[1] / FIELD_OF_VIEW_MM)
    contrast, brightness = rng.uniform(0.6, 1.0), rng.uniform(0.9, 1.3)
    planes = np.moveaxis(image, -1, 0) if image.ndim == 3 else image[None]
    lesioned = []
    for plane in planes:
        level = float(np.percentile(plane[brain], 99))  # the rim's brightness, relative to this slice's tissue
        lesioned.append(plane * (1 - contrast * (0.25 * oedema + 0.5 * core)) + contrast * rim * level * brightness)
    lesioned = np.moveaxis(np.stack(lesioned), 0, -1) if image.ndim == 3 else lesioned[0]
    return np.clip(lesioned, 0, 1).astype(np.float32)


def lesion_curve(classifier: Classifier, negatives: list[np.ndarray], diameters=DIAMETERS_MM, seed: int = 0) -> pd.DataFrame:
    """Detection rate per diameter on the lesioned negatives; the row of diameter 0 is their false-positive rate."""
    rng = np.random.default_rng(seed)
    spec = classifier.spec
    rows = []
    for diameter in (0.0, *diameters):
        images = negatives if diameter == 0 else [insert_lesion(image, diameter, rng) for image in negatives]
        images = [image for image in images if image is not None]
        if not images:
            continue
        detected = tumour_probability(classifier.predict_proba(images), spec) >= spec.operating_threshold
        rows.append({"diameter_mm": diameter, "detection_rate": float(detected.mean()), "slices": len(images)})
    return pd.DataFrame(rows)


def smallest_detected(curve: pd.DataFrame, level: float = DETECTION_LEVEL) -> float:
    """The smallest diameter from which every larger one is detected at ``level`` or more (NaN if none is)."""
    lesions = curve[curve["diameter_mm"] > 0].sort_values("diameter_mm", ascending=False)
    smallest = float("nan")
    for diameter, rate in zip(lesions["diameter_mm"], lesions["detection_rate"]):
        if rate < level:
            break
        smallest = float(diameter)
    return smallest
